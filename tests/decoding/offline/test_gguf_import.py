"""decoding/offline/gguf_import.py on GGUF files written here as llama.cpp writes them (tiny, float32)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from decoding.offline.gguf_import import GGUFImportError, import_gguf
from tests.support.gguf_files import write_llama_gguf

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_verifier_dir, tmp_path_factory):
    return write_llama_gguf(tiny_verifier_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", chat_template=TEMPLATE)


def test_import_reproduces_the_model_and_its_tokenizer(tiny_gguf, tiny_verifier_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "imported"
    result = import_gguf(tiny_gguf, out, progress=False)
    assert result.architecture == "llama" and result.tensor_types == {"F32": 30}
    original = AutoModelForCausalLM.from_pretrained(tiny_verifier_dir)
    imported = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # q/k un-permuted correctly, or attention (and these logits) would differ
        torch.testing.assert_close(imported(ids).logits, original(ids).logits, rtol=0, atol=1e-5)

    a, b = AutoTokenizer.from_pretrained(tiny_verifier_dir), AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x + 1  # héllo wörld\n\n<|endoftext|>"
    assert b.encode(text) == a.encode(text)
    assert b.eos_token == "<|endoftext|>" and b.chat_template == TEMPLATE
    assert b.model_max_length == original.config.max_position_embeddings
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == original.config.eos_token_id
    provenance = json.loads((out / "gguf_import.json").read_text())
    assert provenance["source"] == str(tiny_gguf) and len(provenance["sha256"]) == 64


@pytest.mark.parametrize("keep", [0.6, 0.001])  # cut inside the tensor data; inside the header
def test_truncated_file_names_the_file_and_the_problem(tiny_gguf, tmp_path, keep):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(GGUFImportError, match="truncated") as err:
        import_gguf(cut, tmp_path / "out", progress=False)
    assert str(cut) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_it(tiny_verifier_dir, tmp_path):
    path = write_llama_gguf(tiny_verifier_dir, tmp_path / "qwen.gguf", architecture="qwen2")
    with pytest.raises(GGUFImportError, match=r"architecture 'qwen2'.*Llama-family") as err:
        import_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(err.value)


def test_not_a_gguf_file(tmp_path, tiny_verifier_dir):
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(tiny_verifier_dir / "config.json", tmp_path / "out", progress=False)
    with pytest.raises(GGUFImportError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


def test_refuses_a_non_empty_output_directory(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="not empty"):
        import_gguf(tiny_gguf, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_reports_a_clear_error_without_traceback(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5000])
    proc = subprocess.run([sys.executable, "-m", "service.cli", "models", "import-gguf", str(cut), "--out",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "tandem models: error:" in proc.stderr and "truncated" in proc.stderr and str(cut) in proc.stderr
    assert "Traceback" not in proc.stderr

    ok = subprocess.run([sys.executable, "-m", "service.cli", "models", "import-gguf", str(tiny_gguf), "--out",
                         str(tmp_path / "ok"), "--quiet"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["out"] == str(tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").is_file()
