"""The build-demo recipe at a tiny scale: split, determinism, distillation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decoding.offline.tiny_models import TinySpec
from decoding.offline.training import DemoRecipe, build_demo, distill_kl, split_corpus, weights_digest

TINY = DemoRecipe(
    vocab_size=300,
    max_files=12,
    seq_len=32,
    context=128,
    verifier=TinySpec(32, 2, 2, 1, 64),
    drafter=TinySpec(16, 1, 2, 1, 32),
    verifier_steps=6,
    verifier_batch=2,
    distill_batches=3,
    distill_batch=2,
    onpolicy_batches=2,
    onpolicy_prompt_tokens=8,
    drafter_epochs=4,
    drafter_lr=1e-2,
    top_k=16,
    warmup_steps=2,
    threads=1,
)
MODELS = ("verifier", "drafter", "drafter-data-only")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("build-demo")
    a = build_demo(root / "a", seed=3, recipe=TINY, progress=False, evaluate=False)
    b = build_demo(root / "b", seed=3, recipe=TINY, progress=False, evaluate=False)
    return a, b


def test_reusing_the_saved_verifier_gives_the_same_drafters(builds, tmp_path):
    import shutil

    a, _ = builds
    shutil.copytree(a.out / "verifier", tmp_path / "verifier")
    c = build_demo(tmp_path, seed=3, recipe=TINY, progress=False, evaluate=False, reuse_verifier=True)
    assert c.verifier == a.verifier
    for name in MODELS:
        assert weights_digest(c.out / name) == weights_digest(a.out / name), name


def test_split_is_by_file_seeded_and_disjoint():
    one, two = split_corpus(7, 0.2, max_files=20), split_corpus(7, 0.2, max_files=20)
    assert one.heldout_files == two.heldout_files and one.train_files == two.train_files
    assert not set(one.heldout_files) & set(one.train_files)
    assert len(one.heldout_files) == 4 and len(one.train_files) == 16
    assert split_corpus(8, 0.2, max_files=20).heldout_files != one.heldout_files


def test_build_is_deterministic_given_the_seed(builds):
    a, b = builds
    for name in MODELS:
        assert weights_digest(a.out / name) == weights_digest(b.out / name), name
        assert (a.out / name / "tokenizer.json").read_text() == (b.out / name / "tokenizer.json").read_text()
    assert a.verifier["final_train_loss"] == b.verifier["final_train_loss"]


def test_outputs_are_fp16_with_cards(builds):
    from safetensors import safe_open

    a, _ = builds
    for name in MODELS:
        with safe_open(str(a.out / name / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        card = (a.out / name / "README.md").read_text()
        assert "held-out" in card and "Seed: 3" in card
    assert (a.out / "verifier" / "build.json").is_file()


def test_distillation_loss_decreases(builds):
    a, _ = builds
    d = a.drafter
    assert d["final_train_kl_to_verifier"] < 0.8 * d["initial_train_kl_to_verifier"]
    # The distilled drafter is closer to the verifier than the data-only one trained on the same tokens.
    assert d["final_train_kl_to_verifier"] < a.drafter_data_only["final_train_kl_to_verifier"]


def test_kl_is_zero_against_itself_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    p = torch.softmax(logits, -1)
    top = torch.topk(p, 11, dim=-1)
    assert distill_kl(logits, top.indices, top.values).abs() < 1e-5
    assert distill_kl(torch.randn(2, 5, 11), top.indices, top.values) > 0.01


def test_cli_parses_build_demo():
    from service.cli import build_parser

    args = build_parser().parse_args(["models", "build-demo", "--out", "x", "--seed", "4", "--budget-minutes", "2"])
    assert args.out == "x" and args.seed == 4 and args.budget_minutes == 2.0 and not args.reuse_verifier
    assert Path(args.func.__code__.co_filename).name == "cli.py"
