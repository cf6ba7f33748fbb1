"""The gateway's worst-case memory, as a formula of its settings (docs/gateway.md, "Memory").

Every request that holds a parsed body is preparing (at most ``max_preparing``, the preparation gate of
``service.middleware``), queued (at most ``max_queue``) or running (at most ``max_concurrency``); each costs at
most ``R`` = its body (``max_request_bytes``) a few times over plus ~500 bytes per JSON value (at most
:func:`max_json_values`). A preparing request may also be tokenizing a prompt of at most ``T`` bytes
(``service.plan.PromptBound``), which costs ``τ`` bytes per byte while it runs. Each open connection buffers at
most ``h``. A running slot holds its generation state ``G`` (both models' KV caches for the full context).

    RSS <= RSS_ready + (P + Q + S) * R + P * τ * T + C * h + S * G

The constants are measured (CPython 3.11, pydantic 2, HF fast tokenizers) with a margin;
``tests/service/test_hardening.py`` sends concurrent maximal requests and checks the peak RSS against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Bytes per JSON value of a parsed request: FastAPI's JSON tree plus the validated model (measured: <= 400 B,
#: a chat of bare ``{"role": "user"}`` messages; token ids ~44 B, strings ~25 B).
BYTES_PER_JSON_VALUE = 500
#: Copies of the body bytes a request holds at once: the bytes read, their join, the JSON strings, a check's
#: UTF-8 encoding of a prompt (the model shares the JSON's strings).
BODY_COPIES = 4
#: Peak bytes per text byte while a fast tokenizer encodes (measured 183-235 on byte-level BPE vocabularies).
TOKENIZER_BYTES_PER_TEXT_BYTE = 250
#: Per open connection: one 256 KiB socket read (asyncio's), uvicorn's 64 KiB body buffer, a small body (<= 64 KiB)
#: read before the preparation gate, a 16 KiB head.
CONNECTION_BYTES = 400 << 10


def max_json_values(settings: Any, max_context: int) -> int:
    """How many JSON values (every array, object, number, string...) a generation request may hold: what the
    largest legitimate one needs (a token-id prompt of the whole context, a chat of ``max_messages`` messages
    and parts, ~3 values each) with room to spare (four of each). Counted before the body is parsed
    (``service.middleware.json_values``): parsing costs up to ~500 bytes and ~4 us of event-loop time per value
    (measured on a loaded 2-core box), whatever the bytes, so this bounds both."""
    return 4 * (settings.max_messages + max_context) + 4096


@dataclass(frozen=True)
class MemoryBound:
    """The terms of the formula, in bytes, above the RSS of the ready, idle gateway."""

    requests: int  # (P + Q + S) * R
    tokenizing: int  # P * τ * T
    connections: int  # C * h
    generations: int  # S * G

    @property
    def total(self) -> int:
        return self.requests + self.tokenizing + self.connections + self.generations


def worst_case(
    settings: Any,
    *,
    max_context: int,
    max_text_bytes: int,
    generation_bytes: int,
    connections: int | None = None,
) -> MemoryBound:
    """The bound for ``settings`` (GatewaySettings' fields), a verifier context of ``max_context`` tokens, the
    prompt text bound ``max_text_bytes`` (T) and ``generation_bytes`` (G) per running slot; ``connections``
    open connections (default: ``max_connections``)."""
    per_request = BODY_COPIES * settings.max_request_bytes + BYTES_PER_JSON_VALUE * max_json_values(settings, max_context)
    holders = settings.max_preparing + settings.max_queue + settings.max_concurrency
    return MemoryBound(
        requests=holders * per_request,
        tokenizing=settings.max_preparing * TOKENIZER_BYTES_PER_TEXT_BYTE * max_text_bytes,
        connections=(settings.max_connections if connections is None else connections) * CONNECTION_BYTES,
        generations=settings.max_concurrency * generation_bytes,
    )
