"""The committed demo pair: one vocabulary, lossless greedy speculation, real acceptance."""

from __future__ import annotations

import asyncio
import json

from decoding.default_models import DEMO_DIR

VERIFIER, DRAFTER = DEMO_DIR / "verifier", DEMO_DIR / "drafter"


def test_pair_is_the_demo_default_and_small():
    from decoding.default_models import demo_pair

    assert demo_pair() == (VERIFIER, DRAFTER)  # the default until the real pair is installed
    total = sum(f.stat().st_size for d in DEMO_DIR.iterdir() if d.is_dir() for f in d.iterdir() if f.is_file())
    assert total <= 20 * 1024 * 1024
    for d in (VERIFIER, DRAFTER):
        assert (d / "README.md").is_file() and (d / "model.safetensors").is_file()


def test_same_vocabulary():
    from decoding.causal_lm import check_same_vocabulary, load_tokenizer, read_config

    check_same_vocabulary(load_tokenizer(DRAFTER), load_tokenizer(VERIFIER), "drafter", "verifier")
    assert read_config(DRAFTER)["vocab_size"] == read_config(VERIFIER)["vocab_size"]


def test_greedy_speculative_matches_verifier_only_on_heldout_prompts():
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.offline.tiny_models import stdlib_files
    from decoding.offline.training import heldout_prompts

    build = json.loads((VERIFIER / "build.json").read_text())
    held = set(build["corpus"]["heldout_files"])
    files = [f for f in stdlib_files() if f.name in held]
    assert files, "the held-out files of the build are not in this interpreter's stdlib"
    tokenizer = load_tokenizer(VERIFIER)
    prompts = heldout_prompts(tokenizer, files, 3, 64, seed=123)

    from decoding.verifiers import HFVerifier

    verifier = HFVerifier(CausalLM(VERIFIER))
    drafter = HFDrafter(CausalLM(DRAFTER), cost_ratio=0.1)
    router = SpeculativeRouter(verifier, drafter, tokenizer, SpecOptions(num_draft_tokens=4, adaptive=False))
    params = SamplingParams(max_tokens=32, ignore_eos=True)

    async def run():
        accepted = drafted = 0
        try:
            for ids in prompts:
                spec = await router.generate(ids, params)
                ref = await router.generate(ids, params, SpecOptions(mode="verifier-only"))
                assert spec.token_ids == ref.token_ids
                accepted += spec.stats.accepted_tokens
                drafted += spec.stats.draft_tokens
        finally:
            await verifier.aclose()
            await drafter.aclose()
        return accepted / drafted

    assert asyncio.run(run()) > 0.3
