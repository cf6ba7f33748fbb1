"""Partition a Llama-family causal LM into head, body and tail at layers a < b.

* head (edge):   token embeddings and decoder layers [0, a)
* body (worker): decoder layers [a, b)
* tail (edge):   decoder layers [b, L), the final norm and the LM head

Each side reads only the tensors it runs, straight from the checkpoint's
safetensors files (``safe_open`` opens a file without reading it; a tensor is
read when asked for), so the worker never holds the embeddings or the head and
the edge never holds the middle layers.

The slices are built from transformers' own decoder-layer, rotary-embedding and
RMSNorm classes of the model's family, with a per-slice config whose layers are
renumbered from 0, so every slice can keep its own ``DynamicCache`` (and
``create_causal_mask`` sizes the mask from that cache). Rotary positions are
absolute: a slice is told the position of the first token it is fed, which
must equal its cache length.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask

from decoding.causal_lm import ModelLoadError, check_model_dir

#: Architectures whose decoder layers take (hidden, attention_mask, position_ids,
#: cache, use_cache, position_embeddings) and whose checkpoints use the
#: ``model.layers.{i}.*`` / ``model.embed_tokens`` / ``model.norm`` / ``lm_head`` keys.
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


class SplitConfigError(ValueError):
    """Invalid split points, or a model this partitioner cannot split."""


def parse_layers(spec: str | tuple[int, int | None] | list[int]) -> tuple[int, int | None]:
    """``"a:b"`` (or a pair) -> (a, b). ``"a:"`` means b = L (the worker runs everything after
    the head; the edge keeps only the final norm and LM head), a negative b counts from the end
    (``"1:-1"``: b = L - 1). Resolve with :func:`resolve_layers`; bounds are checked there."""
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) != 2:
            raise SplitConfigError(f"split layers must look like 'a:b' (for example '1:3', '1:' or '1:-1'), got {spec!r}")
        try:
            return int(parts[0]), (int(parts[1]) if parts[1].strip() else None)
        except ValueError:
            raise SplitConfigError(f"split layers must be two integers 'a:b' (b may be empty or negative), got {spec!r}") from None
    a, b = spec
    return int(a), (None if b is None else int(b))


def resolve_layers(a: int, b: int | None, num_layers: int) -> tuple[int, int]:
    """Concrete (a, b) for a model of ``num_layers`` layers, checked."""
    if b is None:
        b = num_layers
    elif b < 0:
        b = num_layers + b
    check_split(a, b, num_layers)
    return a, b


def check_split(a: int, b: int, num_layers: int) -> None:
    """The edge keeps at least one layer before the split (so no embedding crosses
    the network, which would be the tokens themselves); the worker gets at least one."""
    if a < 1:
        raise SplitConfigError(
            f"split point a={a} must be >= 1: the edge must run at least one decoder layer, otherwise the "
            "uplink carries raw token embeddings"
        )
    if b > num_layers:
        raise SplitConfigError(f"split point b={b} exceeds the model's {num_layers} decoder layers")
    if a >= b:
        raise SplitConfigError(f"split points must satisfy a < b (the worker needs at least one layer), got a={a}, b={b}")


def load_config(path: str | Path) -> PretrainedConfig:
    path = check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of {str(path)!r}: {exc}") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SplitConfigError(
            f"split inference supports {', '.join(sorted(SUPPORTED_MODEL_TYPES))} models; "
            f"{str(path)!r} is a {config.model_type!r} model"
        )
    return config


def model_fingerprint(path: str | Path) -> str:
    """A short hash of the model's config: the edge and the worker must agree on it."""
    data = json.loads((check_model_dir(path) / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _family_classes(config: PretrainedConfig) -> tuple[type, type, type]:
    prefix = SUPPORTED_MODEL_TYPES[config.model_type]
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return (
        getattr(module, f"{prefix}DecoderLayer"),
        getattr(module, f"{prefix}RotaryEmbedding"),
        getattr(module, f"{prefix}RMSNorm"),
    )


class CheckpointReader:
    """Reads chosen tensors from a model directory's safetensors files, and records which."""

    def __init__(self, path: str | Path):
        self.path = check_model_dir(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{str(self.path)!r} holds no .safetensors weights (split inference reads only those)")
            self.files = {}
            for f in files:
                with safe_open(f, framework="pt") as handle:
                    for key in handle.keys():
                        self.files[key] = f
        self.read_keys: list[str] = []

    def keys(self) -> list[str]:
        return list(self.files)

    def has(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        keys = list(keys)
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise ModelLoadError(f"{str(self.path)!r} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, ks in by_file.items():
            with safe_open(f, framework="pt") as handle:
                for k in ks:
                    out[k] = handle.get_tensor(k).to(dtype)
        self.read_keys.extend(keys)
        return out

    def read_prefix(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (for example ``model.layers.3.``), keys without the prefix."""
        keys = [k for k in self.files if k.startswith(prefix)]
        if not keys:
            raise ModelLoadError(f"{str(self.path)!r} has no tensors under {prefix!r}")
        return {k[len(prefix) :]: v for k, v in self.read(keys, dtype).items()}


class LayerStack(nn.Module):
    """Decoder layers [start, end) of a model, with their own rotary embedding.

    The layers are renumbered 0..n-1 inside a copy of the config, so a cache
    from :meth:`new_cache` holds exactly this slice.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int, reader: CheckpointReader | None, dtype: torch.dtype):
        super().__init__()
        self.start, self.end = start, end
        n = end - start
        sub = copy.deepcopy(config)
        sub.num_hidden_layers = n
        if getattr(config, "layer_types", None):
            sub.layer_types = list(config.layer_types[start:end])
        # The unsplit model loads with SDPA on this torch; matching it keeps the logits identical.
        sub._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.config = sub
        decoder_cls, rotary_cls, _ = _family_classes(config)
        with torch.device("meta"):
            self.layers = nn.ModuleList(decoder_cls(sub, i) for i in range(n))
        self.rotary_emb = rotary_cls(config=sub)  # its inv_freq is computed, not loaded
        if reader is not None:
            for i, layer in enumerate(self.layers):
                state = reader.read_prefix(f"model.layers.{start + i}.", dtype)
                layer.load_state_dict(state, strict=True, assign=True)
        self.to(dtype)
        self.eval()

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: DynamicCache | None, position: int) -> torch.Tensor:
        """Run the slice over hidden [1, q, H] whose first token sits at ``position``.

        With a cache, it must hold exactly ``position`` tokens; the new ones are
        appended. Without one, ``position`` must be 0 (a full causal pass).
        """
        if self.num_layers == 0:
            return hidden
        if cache is not None and cache.get_seq_length() != position:
            raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens but the step starts at position {position}")
        q = hidden.shape[1]
        position_ids = torch.arange(position, position + q, device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=position_ids
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden


def cache_bytes(cache: DynamicCache | None) -> int:
    """Bytes of the storages that ``cache``'s keys and values hold, each storage counted once.

    The storage, not the view: a cache cropped by a rollback still holds its longer storage until the next append.
    """
    if cache is None:
        return 0
    storages: dict[int, int] = {}
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _ModelSlice(nn.Module):
    """What both sides of a split know of the model: its config, the split point, its fingerprint."""

    def __init__(self, path: str | Path, a: int, b: int | None, dtype: torch.dtype, device: str):
        super().__init__()
        self.path = check_model_dir(path)
        self.config = load_config(self.path)
        self.num_layers = int(self.config.num_hidden_layers)
        self.a, self.b = resolve_layers(a, b, self.num_layers)
        self.hidden_size = int(self.config.hidden_size)
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048))
        self.fingerprint = model_fingerprint(self.path)
        self.reader = CheckpointReader(self.path)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def loaded_keys(self) -> list[str]:
        """The checkpoint tensors this process read."""
        return list(self.reader.read_keys)


class BodyModel(_ModelSlice):
    """The worker's part: decoder layers [a, b), nothing else."""

    def __init__(
        self, path: str | Path, a: int, b: int | None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ):
        super().__init__(path, a, b, dtype, device)
        self.stack = LayerStack(self.config, self.a, self.b, self.reader, dtype).to(device)

    def new_cache(self) -> DynamicCache:
        return self.stack.new_cache()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values that one position adds to a cache of this slice."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * (self.b - self.a) * cfg.num_key_value_heads * head_dim * itemsize

    def forward(self, hidden: torch.Tensor, cache: DynamicCache | None, position: int) -> torch.Tensor:
        return self.stack(hidden, cache, position)


class EdgeModel(_ModelSlice):
    """The edge's part: embeddings, layers [0, a), layers [b, L), final norm and LM head."""

    def __init__(
        self, path: str | Path, a: int, b: int | None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ):
        super().__init__(path, a, b, dtype, device)
        a, b = self.a, self.b
        self.vocab_size = int(self.config.vocab_size)
        reader = self.reader
        _, _, norm_cls = _family_classes(self.config)

        embed = reader.read(["model.embed_tokens.weight"], dtype)["model.embed_tokens.weight"]
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.head = LayerStack(self.config, 0, a, reader, dtype)
        self.tail = LayerStack(self.config, b, self.num_layers, reader, dtype)
        self.norm = norm_cls(self.hidden_size, eps=self.config.rms_norm_eps)
        self.norm.load_state_dict(reader.read_prefix("model.norm.", dtype), strict=True)
        head_key = "lm_head.weight"
        if reader.has(head_key):
            lm_weight = reader.read([head_key], dtype)[head_key]
        elif getattr(self.config, "tie_word_embeddings", False):
            lm_weight = embed
        else:
            raise ModelLoadError(f"{str(self.path)!r} has no lm_head.weight and does not tie it to the embeddings")
        self.lm_head = nn.Linear(self.hidden_size, lm_weight.shape[0], bias=False)
        self.lm_head.weight = nn.Parameter(lm_weight, requires_grad=False)
        self.to(dtype).to(device).eval()

    @torch.inference_mode()
    def run_head(self, token_ids: list[int] | torch.Tensor, cache: DynamicCache | None, position: int) -> torch.Tensor:
        """Token ids [q] -> hidden states after layer a-1, [1, q, H]."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        return self.head(self.embed_tokens(ids), cache, position)

    @torch.inference_mode()
    def run_tail(self, hidden: torch.Tensor, cache: DynamicCache | None, position: int, keep: int) -> torch.Tensor:
        """Hidden states after layer b-1 [1, q, H] -> logits [keep, V] float32 of the last ``keep`` positions."""
        hidden = self.tail(hidden.to(self.dtype), cache, position)
        hidden = self.norm(hidden[:, -keep:, :])
        return self.lm_head(hidden)[0].float()

