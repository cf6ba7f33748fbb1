"""Shared, session-scoped fixtures: tiny models the suite builds itself.

Nothing is downloaded: tokenizers are trained on local text, weights are random
and seeded (see decoding/offline/tiny_models.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels then run in Triton's interpreter on CPU tensors, so CI
    # exercises the kernel source itself. Triton reads this when each
    # @triton.jit function is defined, so it must be set before anything
    # (transformers included) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# LiteLLM fetches a model cost map from the internet at import unless told to use its bundled copy;
# the suite never reaches outside this machine.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytest_plugins = ["tests.support.split", "tests.support.vllm"]

from decoding.offline.tiny_models import TinySpec, build_model, build_tiny_pair, train_bpe_tokenizer, word_tokenizer


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(verifier_dir, drafter_dir): tiny random Llamas sharing a 512-token BPE tokenizer."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_verifier_dir(tiny_pair) -> Path:
    return tiny_pair[0]


@pytest.fixture(scope="session")
def tiny_drafter_dir(tiny_pair) -> Path:
    return tiny_pair[1]


@pytest.fixture(scope="session")
def other_vocab_drafter_dir(tmp_path_factory) -> Path:
    """A drafter whose tokenizer differs from the tiny pair's (different training text and size)."""
    tokenizer = train_bpe_tokenizer(["completely different text " * 50, "zebra quartz " * 40], vocab_size=300)
    return build_model(tmp_path_factory.mktemp("othervocab"), tokenizer, TinySpec(16, 1, 2, 1), seed=5)


@pytest.fixture(scope="session")
def small_vocab_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(verifier, drafter) over a 5-word vocabulary: exact output distributions are enumerable.

    Sharpened logits (logit_scale) make the two models disagree noticeably, so
    the distribution tests exercise rejections and resampling, not just acceptance.
    """
    root = tmp_path_factory.mktemp("smallvocab")
    tokenizer = word_tokenizer(5)
    verifier = build_model(root / "verifier", tokenizer, TinySpec(16, 2, 2, 1, logit_scale=40.0), seed=11)
    drafter = build_model(root / "drafter", tokenizer, TinySpec(16, 1, 2, 1, logit_scale=40.0), seed=12)
    return verifier, drafter


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_verifier_dir):
    from decoding.causal_lm import load_tokenizer

    return load_tokenizer(tiny_verifier_dir)


@pytest.fixture(scope="session")
def tiny_verifier_lm(tiny_verifier_dir):
    from decoding.causal_lm import CausalLM

    lm = CausalLM(tiny_verifier_dir)
    yield lm
    lm.close()


@pytest.fixture(scope="session")
def tiny_drafter_lm(tiny_drafter_dir):
    from decoding.causal_lm import CausalLM

    lm = CausalLM(tiny_drafter_dir)
    yield lm
    lm.close()
