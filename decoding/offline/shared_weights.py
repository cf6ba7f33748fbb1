"""A drafter stored without the tensors it shares with its verifier.

A drafter distilled by ``tandem distill`` keeps its verifier's token embeddings
and LM head frozen (they are most of a small drafter's parameters: 28M of a
3-layer SmolLM2 drafter's 38M). Storing them again would add ~57 MB (fp16) per
drafter, so the slim form holds only the drafter's own tensors:

- ``own.safetensors``: every tensor that is not shared (its layers, final norm);
- ``shared_weights.json``: which drafter tensors are which verifier tensors, and
  the SHA-256 of those verifier tensors and of the verifier's tokenizer, so a
  slim drafter is only ever completed from the verifier it was trained against;
- ``config.json``, ``generation_config.json`` and the rest of the model card files.

:func:`assemble_drafter` turns it back into a plain Hugging Face directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from decoding.causal_lm import ModelLoadError, check_model_dir

MANIFEST = "shared_weights.json"
OWN_WEIGHTS = "own.safetensors"
#: Files taken from the verifier when assembling: the drafter speaks its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verifier_tensor(verifier_dir: Path, name: str) -> torch.Tensor:
    """One tensor of a saved verifier (float32), resolving a tied LM head to the embeddings."""
    verifier_dir = check_model_dir(verifier_dir)
    files = sorted(verifier_dir.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name).float()
    if name == "lm_head.weight":
        return verifier_tensor(verifier_dir, "model.embed_tokens.weight")
    raise ModelLoadError(f"verifier {str(verifier_dir)!r} has no tensor {name!r} in {[f.name for f in files]}")


def shared_names(model: torch.nn.Module) -> dict[str, str]:
    """Drafter tensor name -> verifier tensor name of what a distilled drafter shares."""
    shared = {"model.embed_tokens.weight": "model.embed_tokens.weight"}
    if not model.config.tie_word_embeddings:
        shared["lm_head.weight"] = "lm_head.weight"
    return shared


def save_slim_drafter(
    model: torch.nn.Module, verifier_dir: Path, out: Path, dtype: torch.dtype = torch.float16
) -> dict:
    """Save ``model`` (a drafter whose shared tensors equal the verifier's) into ``out`` in slim form.

    Raises ModelLoadError if a tensor meant to be shared differs from the verifier's.
    Returns the manifest.
    """
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    shared = shared_names(model)
    verifier_sha = {}
    for mine, theirs in shared.items():
        ref = verifier_tensor(verifier_dir, theirs)
        if state[mine].shape != ref.shape or not torch.equal(state[mine].float(), ref):
            raise ModelLoadError(f"drafter tensor {mine} is not the verifier's {theirs}: it cannot be stored as shared")
        verifier_sha[theirs] = tensor_sha256(ref)
    own = {k: v.detach().to(dtype).contiguous() for k, v in state.items() if k not in shared}
    if model.config.tie_word_embeddings:
        own.pop("lm_head.weight", None)
    save_file(own, str(out / OWN_WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    manifest = {
        "about": "tensors shared with the verifier are not stored here; `tandem models install` or "
        "decoding.offline.shared_weights.assemble_drafter completes them from the verifier",
        "shared": shared,
        "verifier_tensor_sha256": verifier_sha,
        "verifier_tokenizer_sha256": file_sha256(check_model_dir(verifier_dir) / "tokenizer.json"),
        "own_sha256": file_sha256(out / OWN_WEIGHTS),
        "own_dtype": str(dtype).removeprefix("torch."),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shipped_digest(slim_dir: Path) -> str:
    """A digest of everything in a slim drafter directory (changes when any file does)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(slim_dir).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def assemble_drafter(slim_dir: Path, verifier_dir: Path, out: Path, progress: bool = True) -> Path:
    """Complete the slim drafter ``slim_dir`` with ``verifier_dir``'s shared tensors into the HF directory ``out``.

    Raises ModelLoadError, naming the files, when the verifier is not the one the
    drafter was distilled against (another tokenizer, other embeddings).
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    slim_dir, verifier_dir = check_model_dir(slim_dir), check_model_dir(verifier_dir)
    manifest_path = slim_dir / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"{str(slim_dir)!r} is not a slim drafter: {MANIFEST} is missing")
    manifest = json.loads(manifest_path.read_text())
    bar = tqdm(total=3, desc=f"assemble drafter {slim_dir.parent.name}", unit="step", disable=not progress, file=sys.stderr)
    tok_file = verifier_dir / "tokenizer.json"
    if not tok_file.is_file() or file_sha256(tok_file) != manifest["verifier_tokenizer_sha256"]:
        raise ModelLoadError(
            f"drafter {str(slim_dir)!r} was distilled against a verifier with another tokenizer than {str(tok_file)!r} "
            f"(sha256 {manifest['verifier_tokenizer_sha256'][:12]}... recorded in {str(manifest_path)!r}); "
            "a drafter and its verifier must share one tokenizer"
        )
    own_file = slim_dir / OWN_WEIGHTS
    if file_sha256(own_file) != manifest["own_sha256"]:
        raise ModelLoadError(f"{str(own_file)!r} does not match its sha256 in {str(manifest_path)!r}: the file is corrupt")
    bar.update()

    config = AutoConfig.from_pretrained(slim_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    with safe_open(str(own_file), framework="pt") as st:
        for k in st.keys():
            state[k] = st.get_tensor(k).float()
    for mine, theirs in manifest["shared"].items():
        t = verifier_tensor(verifier_dir, theirs)
        if tensor_sha256(t) != manifest["verifier_tensor_sha256"][theirs]:
            raise ModelLoadError(
                f"verifier {str(verifier_dir)!r} has another {theirs} than the one drafter {str(slim_dir)!r} was "
                "distilled with (sha256 differs): distill a drafter for this verifier with `tandem distill`"
            )
        state[mine] = t
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{str(slim_dir)!r}: tensors missing {missing} or unexpected {result.unexpected_keys}")
    model.tie_weights()
    bar.update()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (verifier_dir / name).is_file():
            shutil.copy2(verifier_dir / name, out / name)
    for f in slim_dir.iterdir():  # model card, head vocabulary, recipe; not the slim weights
        if f.is_file() and f.name not in (OWN_WEIGHTS, "config.json", *TOKENIZER_FILES):
            shutil.copy2(f, out / f.name)
    bar.update()
    bar.close()
    return out
