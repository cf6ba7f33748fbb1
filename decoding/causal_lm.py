"""A local Hugging Face causal LM with per-sequence KV caches that roll back.

Both in-process backends (the edge drafter and the embedded verifier) sit on
this: each request owns a :class:`CachedSequence`, which feeds only the tokens
its cache lacks and crops the cache back to the accepted prefix after a round,
so no round recomputes the context.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

# Loading a local model takes well under a second; its progress bar is noise.
hf_logging.disable_progress_bar()

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model or tokenizer directory is missing, incomplete or incompatible."""


def check_model_dir(path: str | Path) -> Path:
    """Return ``path`` as a Path, or raise ModelLoadError naming what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist (models load from local directories only)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a Hugging Face model directory: config.json is missing")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a model directory, offline."""
    path = check_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises several unrelated types here
        raise ModelLoadError(f"could not load a tokenizer from {str(path)!r}: {exc}") from exc


def check_same_vocabulary(
    drafter: PreTrainedTokenizerBase, verifier: PreTrainedTokenizerBase, drafter_name: str, verifier_name: str
) -> None:
    """Speculative decoding compares token ids, so both sides must share one vocabulary."""
    dv, vv = drafter.get_vocab(), verifier.get_vocab()
    if dv != vv:
        only_d = len(dv.keys() - vv.keys())
        only_v = len(vv.keys() - dv.keys())
        moved = sum(1 for t in dv.keys() & vv.keys() if dv[t] != vv[t])
        raise ModelLoadError(
            f"drafter {drafter_name!r} and verifier {verifier_name!r} use different vocabularies "
            f"(sizes {len(dv)} vs {len(vv)}; {only_d} tokens only in the drafter, {only_v} only in the verifier, "
            f"{moved} with different ids). They must share one tokenizer."
        )


class CausalLM:
    """A causal LM loaded from a local directory, run on its own worker thread.

    Forward passes run on a single-thread executor: torch already uses every
    core inside one op, so running two passes of one model at once on a CPU
    only adds contention, and it keeps the event loop free while a pass runs.
    """

    def __init__(self, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.path = check_model_dir(path)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load a causal LM from {str(self.path)!r}: {exc}") from exc
        self.model.to(device).eval()
        self.device = torch.device(device)
        config = self.model.config
        self.vocab_size: int = config.vocab_size
        self.max_context: int = int(getattr(config, "max_position_embeddings", 2048))
        self.num_parameters: int = sum(p.numel() for p in self.model.parameters())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tandem-{self.path.name}")

    @property
    def name(self) -> str:
        return self.path.name

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` on this model's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def sequence(self, prompt_ids: Sequence[int]) -> CachedSequence:
        return CachedSequence(self, prompt_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def read_config(path: str | Path) -> dict:
    return json.loads((check_model_dir(path) / "config.json").read_text())


def still_valid(cached: Sequence[int], start: int, tokens: Sequence[int]) -> int:
    """How many cached positions stay valid once ``tokens`` are committed at ``start``.

    The cache holds ``cached`` (the context plus the drafts scored last round); the
    drafts that the committed tokens confirm keep their keys and values.
    """
    valid = min(start, len(cached))
    for cached_tok, tok in zip(cached[start:], tokens):
        if cached_tok != tok:
            break
        valid += 1
    return valid


class CachedSequence:
    """One request's context on one model, with a KV cache that can roll back.

    Invariant: ``cached`` is the list of tokens whose keys/values are in
    ``cache``, and it agrees with ``ids`` (the committed context) on their
    common length. Tokens fed beyond ``ids`` are speculative; :meth:`extend`
    keeps those that the committed tokens confirm and crops the rest.
    """

    def __init__(self, lm: CausalLM, prompt_ids: Sequence[int]):
        self.lm = lm
        self.ids: list[int] = list(prompt_ids)
        self.cached: list[int] = []
        self.cache = DynamicCache(config=lm.model.config)
        self.forward_passes = 0

    def pending(self) -> list[int]:
        """Committed tokens the cache lacks; never empty, because the next
        distribution needs at least the last token to be fed."""
        if len(self.cached) >= len(self.ids):
            self._crop_to(len(self.ids) - 1)
        return self.ids[len(self.cached) :]

    @torch.inference_mode()
    def feed(self, tokens: Sequence[int], keep: int = 1) -> torch.Tensor:
        """Run one forward pass over ``tokens`` after the cached ones.

        Returns logits [keep, V] float32 for the last ``keep`` fed positions:
        row i is the distribution of the token following ``tokens[len-keep+i]``.
        """
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.lm.device)
        out = self.lm.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.cached.extend(tokens)
        self.forward_passes += 1
        return out.logits[0].float()

    def extend(self, tokens: Sequence[int]) -> None:
        """Commit ``tokens`` to the context; roll the cache back to the longest
        prefix that is still valid (the accepted drafts)."""
        start = len(self.ids)
        self.ids.extend(tokens)
        self._crop_to(still_valid(self.cached, start, tokens))

    def _crop_to(self, length: int) -> None:
        drop = len(self.cached) - length
        if drop > 0:
            self.cache.crop(-drop)  # transformers 5: a negative count removes that many tokens
            del self.cached[length:]
