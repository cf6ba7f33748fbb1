"""A local Hugging Face causal LM with per-sequence KV caches that roll back.

Both in-process backends (the edge drafter and the embedded verifier) sit on
this: each request owns a :class:`CachedSequence`, which feeds only the tokens
its cache lacks and crops the cache back to the accepted prefix after a round,
so no round recomputes the context. The bookkeeping of that rollback is
:class:`RollbackContext`, which the split edge's session shares.
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
        only_d = sorted(dv.keys() - vv.keys(), key=dv.get)
        only_v = len(vv.keys() - dv.keys())
        moved = sorted((t for t in dv.keys() & vv.keys() if dv[t] != vv[t]), key=dv.get)
        examples = ", ".join(f"{t!r} is {dv[t]} in the drafter, {vv[t]} in the verifier" for t in moved[:2]) or (
            f"{only_d[0]!r} is only in the drafter" if only_d else "")
        raise ModelLoadError(
            f"drafter {drafter_name!r} and verifier {verifier_name!r} use different vocabularies "
            f"(tokenizers {_tokenizer_file(drafter_name)} vs {_tokenizer_file(verifier_name)}: sizes {len(dv)} vs "
            f"{len(vv)}; {len(only_d)} tokens only in the drafter, {only_v} only in the verifier, {len(moved)} with "
            f"different ids{'; e.g. ' + examples if examples else ''}). Speculative decoding compares token ids, so "
            "they must share one tokenizer: make a drafter for this verifier with `tandem distill`."
        )


def _tokenizer_file(name: str) -> str:
    path = Path(name) / "tokenizer.json"
    return str(path) if path.is_file() else name


#: A drafter directory may carry this file: the token ids its LM head scores (``tandem distill --head-tokens``).
HEAD_VOCABULARY = "head_vocabulary.json"


def restrict_head(model: torch.nn.Module, path: Path) -> torch.Tensor | None:
    """Keep only the LM-head rows that ``path/head_vocabulary.json`` lists; return their ids [V'] (int64).

    A drafter's head over a large vocabulary costs as much as several of its layers.
    With fewer rows the other tokens get logit -inf (see CachedSequence.feed): the
    drafter never proposes them, and since the verifier still checks every token,
    output stays lossless (q(x) = 0 where the head has no row).
    """
    file = path / HEAD_VOCABULARY
    if not file.is_file():
        return None
    try:
        ids = torch.tensor(json.loads(file.read_text())["token_ids"], dtype=torch.long)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{str(file)!r} is not a head vocabulary (a JSON object with token_ids): {exc}") from None
    head = model.get_output_embeddings()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= head.weight.shape[0]:
        raise ModelLoadError(f"{str(file)!r} lists token ids outside the model's {head.weight.shape[0]} logits")
    small = torch.nn.Linear(head.weight.shape[1], len(ids), bias=False, dtype=head.weight.dtype, device=head.weight.device)
    small.weight = torch.nn.Parameter(head.weight.detach()[ids].clone(), requires_grad=False)
    model.set_output_embeddings(small)
    return ids


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
        self.head_token_ids = restrict_head(self.model, self.path)
        if self.head_token_ids is not None:
            self.head_token_ids = self.head_token_ids.to(self.device)
        self.max_context: int = int(getattr(config, "max_position_embeddings", 2048))
        self.num_parameters: int = sum(p.numel() for p in self.model.parameters())
        if self.head_token_ids is not None:
            # The cost-ratio proxy: with a reduced head the input embedding is only a lookup
            # (it was also the head when tied), so it is not part of a forward pass's work.
            self.num_parameters -= self.model.get_input_embeddings().weight.numel()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tandem-{self.path.name}")

    @property
    def name(self) -> str:
        return self.path.name

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` on this model's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [n, V'] of the model's head as [n, V]: with a reduced head (see :func:`restrict_head`),
        the tokens it has no row for get -inf, so they are impossible."""
        if self.head_token_ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, self.head_token_ids] = logits
        return full

    def sequence(self, prompt_ids: Sequence[int]) -> CachedSequence:
        return CachedSequence(self, prompt_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def read_config(path: str | Path) -> dict:
    return json.loads((check_model_dir(path) / "config.json").read_text())


def crop_cache(cache: DynamicCache | None, length: int) -> None:
    """Drop the cached positions from ``length`` on (keys and values of every layer)."""
    if cache is None:
        return
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)  # transformers 5: a negative count removes that many tokens


class RollbackContext:
    """A request's committed context against the tokens its KV cache(s) hold, and the rollback rule.

    ``ids`` is the committed context. ``cached`` lists the tokens whose keys and
    values the owner's caches hold: a prefix of ``ids``, then the drafts fed
    last round. Invariant: ``cached`` agrees with ``ids`` on their common length.

    The rule, in one place: :meth:`extend` commits tokens, keeps the cached
    drafts they confirm and crops the rest; :meth:`pending` re-feeds at least the
    last committed token, because the next distribution is read off its row.
    Subclasses own the caches: :meth:`fed` records what they appended, and
    :meth:`_crop_cache` is called with the length to keep whenever they must shrink.
    """

    def __init__(self, prompt_ids: Sequence[int]):
        self.ids: list[int] = list(prompt_ids)
        self.cached: list[int] = []

    def _crop_cache(self, length: int) -> None:
        """Drop every cached position from ``length`` on (the owner's caches)."""
        raise NotImplementedError

    def pending(self) -> list[int]:
        """Committed tokens the cache lacks; never empty, because the next
        distribution needs at least the last token to be fed."""
        if len(self.cached) >= len(self.ids):
            self._crop_to(len(self.ids) - 1)
        return self.ids[len(self.cached) :]

    def fed(self, tokens: Sequence[int]) -> None:
        """Record that ``tokens`` were appended to the caches."""
        self.cached.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Commit ``tokens`` to the context; roll the caches back to the longest
        prefix that is still valid (the accepted drafts)."""
        start = len(self.ids)
        self.ids.extend(tokens)
        valid = min(start, len(self.cached))
        for cached_tok, tok in zip(self.cached[start:], tokens):
            if cached_tok != tok:
                break
            valid += 1
        self._crop_to(valid)

    def _crop_to(self, length: int) -> None:
        if len(self.cached) > length:
            self._crop_cache(length)
            del self.cached[length:]


class CachedSequence(RollbackContext):
    """One request's context on one model, with a KV cache that can roll back."""

    def __init__(self, lm: CausalLM, prompt_ids: Sequence[int]):
        super().__init__(prompt_ids)
        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)
        self.forward_passes = 0

    @torch.inference_mode()
    def feed(self, tokens: Sequence[int], keep: int = 1) -> torch.Tensor:
        """Run one forward pass over ``tokens`` after the cached ones.

        Returns logits [keep, V] float32 for the last ``keep`` fed positions:
        row i is the distribution of the token following ``tokens[len-keep+i]``.
        """
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.lm.device)
        out = self.lm.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.fed(tokens)
        self.forward_passes += 1
        return self.lm.full_logits(out.logits[0].float())

    def reset_cache(self) -> None:
        """Forget every cached position (after a failed pass left the caches' layers uneven)."""
        self.cache = DynamicCache(config=self.lm.model.config)
        self.cached = []

    def _crop_cache(self, length: int) -> None:
        crop_cache(self.cache, length)
