"""Split inference on the real verifier at noise 0: the same tokens as the unsplit model (HF generate)."""

from __future__ import annotations

import asyncio

from tests.realmodels.conftest import CODE, hf_greedy
from tests.support.split import WorkerProcess


def test_split_speculative_at_noise_zero_equals_hf_generate(real_pair, real_verifier_hf):
    from decoding.backends.split_edge import SplitVerifier
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.partition import EdgeModel
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter

    verifier_dir, drafter_dir = real_pair
    model, _ = real_verifier_hf
    tok = load_tokenizer(verifier_dir)
    prompt = tok.encode(CODE)
    ref = hf_greedy(model, prompt, 24, stop_at_eos=False)
    worker = WorkerProcess(verifier_dir, "2:28")  # the edge keeps layers 0-1 and 28-29, embeddings and head
    worker.start()
    try:
        edge = EdgeModel(verifier_dir, 2, 28)
        drafter = HFDrafter(CausalLM(drafter_dir), cost_ratio=0.15)

        async def run(options):
            verifier = SplitVerifier(edge, worker.url, token=worker.token, noise_scale=0.0)
            try:
                router = SpeculativeRouter(verifier, drafter, tok)
                return await router.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True), options)
            finally:
                await verifier.aclose()

        plain = asyncio.run(run(SpecOptions(mode="verifier-only")))
        spec = asyncio.run(run(SpecOptions(mode="speculative", num_draft_tokens=4)))
    finally:
        worker.stop()
    assert plain.token_ids == ref
    assert spec.token_ids == ref and spec.stats.draft_tokens > 0
