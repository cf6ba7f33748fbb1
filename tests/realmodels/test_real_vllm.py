"""The real verifier in vLLM (`tandem verifier --model` on the imported directory): greedy speculation
with the real drafter through tandem's verify route is token-identical to HF generate."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from loadtests.vllm_server import VLLMServer, vllm_python
from tests.support.vllm import TEST_SERVER_ARGS
from tests.realmodels.conftest import CODE, hf_greedy


@pytest.fixture(scope="module")
def real_vllm(real_pair, tmp_path_factory):
    python = vllm_python()
    if not python.exists():
        pytest.fail(f"vLLM is not installed: {python} does not exist (make install-vllm)", pytrace=False)
    server = VLLMServer(real_pair[0], python=python, extra_args=TEST_SERVER_ARGS,
                        log_path=Path(tmp_path_factory.mktemp("real_vllm")) / "vllm.log")  # fmt: skip
    try:
        server.start(timeout_s=float(os.environ.get("TANDEM_VLLM_START_TIMEOUT_S", "600")))
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(f"could not start vLLM on the real verifier: {exc}", pytrace=False)
    yield server
    server.stop()


def test_speculative_through_vllm_equals_hf_generate(real_vllm, real_pair, real_verifier_hf):
    from decoding.backends.vllm_client import VLLMVerifier
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter

    model, _ = real_verifier_hf
    tok = load_tokenizer(real_pair[0])
    prompt = tok.encode(CODE)
    ref = hf_greedy(model, prompt, 32, stop_at_eos=False)
    verifier = VLLMVerifier(real_vllm.url, tok)
    drafter = HFDrafter(CausalLM(real_pair[1]), cost_ratio=0.1)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    spec = asyncio.run(SpeculativeRouter(verifier, drafter, tok, SpecOptions(num_draft_tokens=4)).generate(prompt, params))
    only = asyncio.run(SpeculativeRouter(verifier, drafter, tok, SpecOptions(mode="verifier-only")).generate(prompt, params))
    assert only.token_ids == ref
    assert spec.token_ids == ref and spec.stats.draft_tokens > 0
    assert verifier.stats.failures == 0 and verifier.stats.invalid_responses == 0
