"""What is sent and when: prompts of a set token length (held-out text or random ids) and the arrival
process (gamma-distributed gaps at the request rate, as ``vllm bench serve``)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from loadtests.load.config import RunConfig


class TokenCounter:
    """A Hugging Face ``tokenizer.json`` loaded with ``tokenizers`` (fast; no torch)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        path = Path(directory)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"load: no tokenizer.json at {path} (pass --tokenizer DIR of the served model)")
        self.tok = Tokenizer.from_file(str(path))
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


def default_tokenizer_dir() -> Path:
    """The served default's tokenizer: the demo pair (or the tiny fallback pair tandem builds)."""
    from decoding.default_models import default_pair

    return default_pair()[1]


@dataclass
class Prompt:
    text: str
    tokens: int


def heldout_files(seed: int = 0, heldout_fraction: float = 0.1) -> list[Path]:
    """The demo pair's held-out files (never trained on), chosen exactly as ``decoding.offline.training.split_corpus``
    chooses them (this interpreter's stdlib ``.py`` files, seeded shuffle), without importing torch.
    tests/deploy checks that the two agree."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    order = sorted(p for p in root.glob("*.py") if p.is_file())
    random.Random(seed).shuffle(order)
    return sorted(order[: max(1, round(heldout_fraction * len(order)))])


def heldout_texts(seed: int = 0) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in heldout_files(seed)]


def make_prompts(cfg: RunConfig, tok: TokenCounter, n: int) -> list[Prompt]:
    """``n`` prompts of about ``input_len`` tokens (exactly, under ``tok``, for held-out text)."""
    rng = random.Random(cfg.seed)
    prompts: list[Prompt] = []
    if cfg.dataset == "random":
        # vLLM's random dataset: uniformly random token ids, decoded to text.
        special = {i for i in range(tok.vocab_size) if tok.tok.id_to_token(i) in ("<|endoftext|>", "<|pad|>")}
        ids_pool = [i for i in range(tok.vocab_size) if i not in special]
        for _ in range(n):
            ids = [rng.choice(ids_pool) for _ in range(cfg.input_len)]
            text = tok.decode(ids)
            prompts.append(Prompt(text, len(tok.encode(text))))
        return prompts
    if cfg.dataset != "heldout":
        raise SystemExit(f"load: unknown dataset {cfg.dataset!r} (heldout or random)")
    per_file = []
    for text in heldout_texts(0):
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)]
        per_file.append((text, starts))
    attempts = 0
    while len(prompts) < n and attempts < 100 * n + 100:
        text, starts = per_file[attempts % len(per_file)]
        attempts += 1
        pos = starts[rng.randrange(len(starts))]
        ids = tok.encode(text[pos : pos + 8 * cfg.input_len + 64])
        if len(ids) >= cfg.input_len:
            prompts.append(Prompt(tok.decode(ids[: cfg.input_len]), cfg.input_len))
    if len(prompts) < n:
        raise SystemExit(f"load: the held-out files yield only {len(prompts)} prompts of {cfg.input_len} tokens")
    return prompts


def arrival_gap(rate: float, burstiness: float, rng: random.Random) -> float:
    """Seconds to the next request: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate, as vLLM.
    Burstiness 1 gives exponential gaps (a Poisson process); the coefficient of variation is 1/sqrt(burstiness)."""
    if math.isinf(rate):
        return 0.0
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


async def arrivals(cfg: RunConfig, n_prompts: int, rng: random.Random) -> AsyncIterator[int]:
    """Prompt indices at the request rate (gamma gaps, as vLLM), until num_prompts or duration."""
    t0 = time.perf_counter()
    i = 0
    while True:
        if cfg.duration is not None:
            if time.perf_counter() - t0 >= cfg.duration:
                return
        elif i >= cfg.num_prompts:
            return
        yield i % n_prompts
        i += 1
        if not math.isinf(cfg.request_rate):
            await asyncio.sleep(arrival_gap(cfg.request_rate, cfg.burstiness, rng))
