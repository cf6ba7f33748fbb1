"""Turn a Llama-family GGUF file into a Hugging Face model directory: ``tandem models import-gguf``.

GGUF (llama.cpp's format) is how many pretrained models travel, often quantized.
tandem's backends load Hugging Face directories, so the import dequantizes every
tensor, un-permutes llama.cpp's rotary layout of the query/key projections
(transformers' own GGUF reader does both) and writes:

- ``config.json`` and ``model.safetensors`` (a clean ``LlamaForCausalLM``; the
  dequantized values are kept exactly in float32 by default),
- the tokenizer, rebuilt from the file's vocabulary and merges, with its chat
  template and ``model_max_length`` set to the model's context,
- ``generation_config.json`` with the file's BOS/EOS/PAD ids, so HF ``generate``
  stops where tandem stops,
- ``gguf_import.json``: the source file, its SHA-256 and the conversion's provenance.

The directory appears whole or not at all (written beside the target, then
renamed). Files that are not GGUF, are truncated, or hold another architecture
fail with :class:`GGUFImportError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from decoding.causal_lm import ModelLoadError

#: GGUF ``general.architecture`` values imported. llama.cpp writes Llama 1/2/3,
#: Mistral, SmolLM, TinyLlama and other Llama-shaped models as "llama".
SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"


class GGUFImportError(ModelLoadError):
    """A GGUF file that cannot be imported: the message names the file and why."""


@dataclass
class ImportResult:
    out: Path
    source: str
    sha256: str
    architecture: str
    name: str | None
    parameters: int
    tensor_types: dict[str, int]
    dtype: str
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def open_gguf(path: str | Path):
    """Open ``path`` with gguf's reader after checking that it is a whole GGUF file.

    Raises GGUFImportError for a missing file, a file that is not GGUF, and a
    truncated one (with how many bytes its tensors need and how many it has).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFImportError(f"GGUF file {str(path)!r} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(
            f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r}"
        )

    class CheckedReader(GGUFReader):
        # The stock reader maps each tensor as a numpy view of the file; on a truncated
        # file that fails with an unrelated reshape error. Compare the extent first.
        def _build_tensors(self, start_offs, fields):
            need = 0
            for field in fields:
                _, _, _, dims, raw_dtype, offset = field.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_dtype[0])]
                n_bytes = int(torch.tensor(dims.tolist()).prod()) * type_size // block
                need = max(need, int(start_offs + offset[0]) + n_bytes)
            if need > len(self.data):
                raise GGUFImportError(
                    f"{str(path)!r} is truncated: its {len(fields)} tensors need {need:,} bytes but the file has "
                    f"{len(self.data):,} ({100 * len(self.data) / need:.1f}%). Download or copy it again."
                )
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except GGUFImportError:
        raise
    except Exception as exc:  # the reader indexes past the end of a cut header
        raise GGUFImportError(
            f"{str(path)!r} is truncated or corrupt: its GGUF header could not be read ({size:,} bytes; "
            f"{type(exc).__name__}: {exc})"
        ) from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def import_gguf(
    gguf: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32, progress: bool = True
) -> ImportResult:
    """Convert the Llama-family GGUF file ``gguf`` into the HF directory ``out``.

    ``out`` must not exist yet (or be empty); it is written whole or not at all.
    Weights are saved in ``dtype`` (float32 keeps the dequantized values exactly).
    """
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    gguf, out = Path(gguf).expanduser().resolve(), Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise GGUFImportError(f"output directory {str(out)!r} is not empty")
    reader = open_gguf(gguf)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{str(gguf)!r} holds a model of architecture {arch!r}; tandem imports Llama-family GGUF files "
            f"(general.architecture one of {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if _field(reader, "tokenizer.ggml.model") is None:
        raise GGUFImportError(f"{str(gguf)!r} carries no tokenizer (no tokenizer.ggml.model field)")
    tensor_types: dict[str, int] = {}
    for t in reader.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    name = _field(reader, "general.name")
    del reader

    steps = tqdm_steps(progress, 4, f"import {gguf.name}")
    meta = load_gguf_checkpoint(str(gguf), return_tensors=False)
    config_kwargs = dict(meta["config"])
    config_kwargs.pop("_model_name_or_path", None)
    if config_kwargs.pop("model_type", "llama") not in ("llama", "mistral"):
        raise GGUFImportError(f"{str(gguf)!r}: transformers reads it as a non-Llama model")
    config = LlamaConfig(**config_kwargs)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    steps.update()

    # transformers' reader dequantizes tensor by tensor and shows its own bar.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    try:
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    except Exception as exc:
        raise GGUFImportError(f"{str(gguf)!r}: its tensors could not be read: {type(exc).__name__}: {exc}") from None
    finally:
        (hf_logging.enable_progress_bar if bars_were_on else hf_logging.disable_progress_bar)()
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise GGUFImportError(
            f"{str(gguf)!r} does not match a Llama model of its own config: missing {missing[:5]} "
            f"({len(missing)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    for key, value in tensors.items():
        if model.state_dict()[key].shape != value.shape:  # load_state_dict raised already; belt and braces
            raise GGUFImportError(f"{str(gguf)!r}: tensor {key} has shape {tuple(value.shape)}")
    del tensors
    model.tie_weights()
    model.to(dtype).eval()
    steps.update()

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise GGUFImportError(f"{str(gguf)!r}: its tokenizer could not be rebuilt: {type(exc).__name__}: {exc}") from None
    tokenizer.model_max_length = config.max_position_embeddings
    steps.update()

    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.importing-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _clean_tokenizer_config(tmp / "tokenizer_config.json")
        result = ImportResult(
            out=out,
            source=str(gguf),
            sha256=sha256_file(gguf),
            architecture=arch,
            name=name,
            parameters=sum(p.numel() for p in model.parameters()),
            tensor_types=tensor_types,
            dtype=str(dtype).removeprefix("torch."),
            seconds=0.0,
        )
        result.seconds = round(time.perf_counter() - t0, 1)
        (tmp / "gguf_import.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        for f in tmp.iterdir():  # mkdtemp and safetensors create owner-only files; a cache is shared
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps.update()
    steps.close()
    return result


def _clean_tokenizer_config(path: Path) -> None:
    """Drop the loading flags that from_pretrained records as if they were settings."""
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def tqdm_steps(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, file=sys.stderr)


def main_import_gguf(args) -> int:
    """Entry point of ``tandem models import-gguf``."""
    result = import_gguf(args.gguf, args.out, dtype=getattr(torch, args.dtype), progress=not args.quiet)
    print(json.dumps(result.to_dict(), indent=2))
    return 0
