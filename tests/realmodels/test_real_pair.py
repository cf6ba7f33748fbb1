"""The real pair in process: the importer's output, the installed drafter, lossless speculation vs HF generate."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from tests.realmodels.conftest import CHAT, CODE, hf_greedy


def test_imported_verifier_is_smollm2_with_its_chat_template(real_pair):
    from decoding.causal_lm import load_tokenizer, read_config

    verifier, drafter = real_pair
    config = read_config(verifier)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    tok = load_tokenizer(verifier)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert json.loads((verifier / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert read_config(drafter)["num_hidden_layers"] < 30
    assert (drafter / "head_vocabulary.json").is_file() and (drafter / "README.md").is_file()


def test_shipped_drafter_is_small_and_holds_only_its_own_tensors():
    from decoding.default_models import SHIPPED_DRAFTER

    files = {f.name: f.stat().st_size for f in SHIPPED_DRAFTER.iterdir()}
    assert sum(files.values()) <= 20 * 10**6, files
    assert "model.safetensors" not in files and {"own.safetensors", "shared_weights.json", "README.md"} <= files.keys()


def test_install_is_idempotent_and_fast_when_done(real_pair):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "models", "install", "--quiet"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["default_pair"] is True and out["verifier"] == str(real_pair[0])
    assert "de-quantizing" not in proc.stderr  # nothing converted again


@pytest.mark.parametrize("workload", ["code", "chat"])
def test_speculative_greedy_is_token_identical_to_hf_generate(real_pair, real_verifier_hf, workload):
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.verifiers import HFVerifier

    model, hf_tok = real_verifier_hf
    tok = load_tokenizer(real_pair[0])
    if workload == "code":
        prompt = tok.encode(CODE)
        params, ref = SamplingParams(max_tokens=40, ignore_eos=True), hf_greedy(model, prompt, 40, stop_at_eos=False)
    else:
        prompt = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
        params, ref = SamplingParams(max_tokens=64), hf_greedy(model, prompt, 64)
        assert ref[-1] == tok.eos_token_id, "the reference answer should end at <|im_end|> within 64 tokens"
    verifier, drafter = HFVerifier(CausalLM(real_pair[0])), HFDrafter(CausalLM(real_pair[1]), cost_ratio=0.15)
    router = SpeculativeRouter(verifier, drafter, tok, SpecOptions(num_draft_tokens=4))

    async def run():
        try:
            return await router.generate(prompt, params)
        finally:
            await verifier.aclose()
            await drafter.aclose()

    gen = asyncio.run(run())
    assert gen.token_ids == ref
    assert gen.stats.rounds >= 1 and gen.stats.draft_tokens > 0
    if workload == "chat":
        assert gen.finish_reason == "stop" and "<|im_end|>" not in gen.text


def test_truncated_real_gguf_names_the_file(real_pair, tmp_path):
    from decoding.offline.gguf_import import GGUFImportError, import_gguf
    from decoding.offline.install import wheel_gguf

    gguf, _ = wheel_gguf()
    cut = tmp_path / "SmolLM2-cut.gguf"
    with gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(gguf.stat().st_size // 2))
    with pytest.raises(GGUFImportError, match=r"is truncated: its 272 tensors need [\d,]+ bytes but the file has") as err:
        import_gguf(cut, tmp_path / "out", progress=False)
    assert str(cut) in str(err.value) and not (tmp_path / "out").exists()


def test_real_gguf_of_another_architecture_is_refused(real_pair, tmp_path):
    """The wheel's file with its architecture field rewritten to 'qwen2' (same length, so the file stays valid)."""
    from decoding.offline.gguf_import import GGUFImportError, import_gguf
    from decoding.offline.install import wheel_gguf

    gguf, _ = wheel_gguf()
    other = tmp_path / "other-arch.gguf"
    shutil.copyfile(gguf, other)
    key = b"general.architecture"
    with other.open("r+b") as f:
        head = f.read(1 << 16)
        at = head.index(key) + len(key) + 4 + 8  # value type (uint32), string length (uint64)
        assert head[at : at + 5] == b"llama"
        f.seek(at)
        f.write(b"qwen2")
    with pytest.raises(GGUFImportError, match="architecture 'qwen2'") as err:
        import_gguf(other, tmp_path / "out", progress=False)
    assert str(other) in str(err.value)


def test_pair_with_another_tokenizer_fails_naming_both_files(real_pair):
    from decoding.default_models import DEMO_DIR

    proc = subprocess.run([sys.executable, "-m", "service.cli", "generate", "--prompt", "x", "--verifier",
                           str(real_pair[0]), "--drafter", str(DEMO_DIR / "drafter")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(real_pair[0] / "tokenizer.json") in proc.stderr and str(DEMO_DIR / "drafter" / "tokenizer.json") in proc.stderr
    assert "use different vocabularies" in proc.stderr
