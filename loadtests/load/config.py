"""What one load run is: the server, the traffic and what is reported (``RunConfig``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    api_key: str | None = None
    dataset: str = "heldout"
    input_len: int = 128
    output_len: int = 64
    num_prompts: int = 200
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration: float | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    goodput: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    timeout: float = 300.0
    metrics_url: str | None = ""  # "" = base_url + /metrics; None = do not scrape
    tokenizer: str | None = None
    label: str | None = None
    probe: bool = True
    progress: bool = True

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return d


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise argparse.ArgumentTypeError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if out[name] <= 0:
            raise argparse.ArgumentTypeError(f"--goodput {item!r}: the SLO must be > 0 ms")
    return out
