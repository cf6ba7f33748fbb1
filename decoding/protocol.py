"""The wire formats of tandem's remote verifiers, imported by both sides of each.

Verify protocol (JSON over HTTP; the vLLM client ``decoding.backends.vllm_client``
and the route inside vLLM ``service.vllm.route``; docs/vllm-verifier.md): the
route prefix and version, the request and response fields, their limits, and
the vocabulary fingerprint both sides compute. See the section at the end.

Split frame (the split edge ``decoding.backends.split_edge`` and the split
worker ``service.split_worker``): a small header, then one raw tensor.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"TSPL"
    4       2     version (1)
    6       4     header length N (bytes, at most 4096)
    10      N     header: a UTF-8 JSON object (session id, positions, dtype, shape, ...)
    10+N    ...   payload: the tensor's raw bytes, row-major, of header["dtype"] and header["shape"]

The header never carries numbers of the tensor, only its description; the
payload is the tensor's memory as is (float16 / bfloat16 / float32), so a
[n, H] fp16 frame is 2·n·H bytes plus a ~150-byte header. Requests and
responses use the same frame (content type ``application/x-tandem-split``).
A header nests at most ``MAX_HEADER_DEPTH`` levels (checked before it is
parsed); a step request's header is :class:`StepHeader`, field by field.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Mapping
from typing import Literal, TypedDict

import torch
from pydantic import BaseModel, ConfigDict, Field

MAGIC = b"TSPL"
VERSION = 1
CONTENT_TYPE = "application/x-tandem-split"
MAX_HEADER_BYTES = 4096
#: Deepest nesting of arrays and objects in a header (the object itself is level 1; ``layers`` is level 2).
MAX_HEADER_DEPTH = 4
_PREFIX = struct.Struct("<4sHI")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("the split wire format assumes a little-endian host")


class WireError(ValueError):
    """A malformed frame; the message says what is wrong."""


class StepHeader(BaseModel):
    """The header of a step request (edge -> worker), every field typed strictly: ``true`` is not 1, ``1.5`` is
    not a position, unknown fields are refused. ``dtype`` and ``shape`` describe the payload (see :func:`decode`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    session: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="The edge's session id.")
    start: int = Field(ge=0, description="Position of the first row; the worker crops the session's cache to it.")
    return_from: int | None = Field(None, ge=0, description="First position to return (default: start).")
    layers: list[int] | None = Field(None, min_length=2, max_length=2, description="[a, b] the edge expects.")
    fingerprint: str | None = Field(None, max_length=128, description="The model fingerprint the edge expects.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shape: list[int] | None = Field(None, max_length=8)


def header_depth(meta: bytes, limit: int) -> int:
    """Nesting depth of the JSON text ``meta`` (strings skipped), counted up to ``limit + 1`` and no further:
    so a deep header costs one bounded scan, never the parser's recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in meta:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def encode(header: dict, tensor: torch.Tensor | None = None) -> bytes:
    """Frame ``header`` and, if given, ``tensor`` (sent in its own dtype)."""
    header = dict(header)
    payload = b""
    if tensor is not None:
        if tensor.dtype not in DTYPE_NAMES:
            raise WireError(f"cannot send a {tensor.dtype} tensor; use one of {', '.join(DTYPES)}")
        t = tensor.detach().to("cpu").contiguous()
        header["dtype"] = DTYPE_NAMES[t.dtype]
        header["shape"] = list(t.shape)
        payload = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    meta = json.dumps(header, separators=(",", ":")).encode()
    if len(meta) > MAX_HEADER_BYTES:
        raise WireError(f"frame header is {len(meta)} bytes; the limit is {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, VERSION, len(meta)) + meta + payload


def decode(data: bytes) -> tuple[dict, torch.Tensor | None]:
    """Parse a frame -> (header, tensor or None). Raises WireError naming the problem."""
    if len(data) < _PREFIX.size:
        raise WireError(f"frame is {len(data)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, meta_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a tandem split frame (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"unsupported frame version {version} (this side speaks version {VERSION})")
    if meta_len > MAX_HEADER_BYTES:
        raise WireError(f"frame header length {meta_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    end = _PREFIX.size + meta_len
    if len(data) < end:
        raise WireError(f"frame is truncated: header needs {meta_len} bytes, {len(data) - _PREFIX.size} present")
    meta = data[_PREFIX.size : end]
    if header_depth(meta, MAX_HEADER_DEPTH) > MAX_HEADER_DEPTH:
        raise WireError(f"frame header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(meta)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    payload = memoryview(data)[end:]
    if "dtype" not in header and "shape" not in header:
        if len(payload):
            raise WireError(f"frame carries {len(payload)} payload bytes but its header describes no tensor")
        return header, None
    dtype_name, shape = header.get("dtype"), header.get("shape")
    if dtype_name not in DTYPES:
        raise WireError(f"tensor dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise WireError(f"tensor shape must be a list of non-negative integers, got {shape!r}")
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(payload) != expected:
        raise WireError(
            f"payload is {len(payload)} bytes but a {dtype_name} tensor of shape {shape} needs {expected}"
        )
    if expected == 0:
        return header, torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)
    return header, tensor


# -- the verify protocol (version 1): decoding.backends.vllm_client <-> service.vllm.route ---------

VERIFY_PROTOCOL_VERSION = 1
VERIFY_ROUTE_PREFIX = "/tandem/v1"
INFO_PATH = f"{VERIFY_ROUTE_PREFIX}/info"
VERIFY_PATH = f"{VERIFY_ROUTE_PREFIX}/verify"
SESSIONS_PATH = f"{VERIFY_ROUTE_PREFIX}/sessions"  # DELETE {SESSIONS_PATH}/{session}
#: GET: the served model's tokenizer files, for an edge without a model of its own (the n-gram drafter).
TOKENIZER_PATH = f"{VERIFY_ROUTE_PREFIX}/tokenizer"
#: The only files TOKENIZER_PATH may carry (data, never code): what ``save_pretrained`` of a fast tokenizer writes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
#: Most draft tokens one round may carry.
MAX_DRAFT = 64
#: A logprob above this is invalid (log-softmax is <= 0; allow float rounding, then clamp to 0).
LOGPROB_SLACK = 1e-3
#: Session ids and cache salts: 1..128 characters.
MAX_ID_CHARS = 128
#: The 409 error code of a server that does not hold ``base`` tokens of the session: resend with base 0.
UNKNOWN_SESSION = "unknown_session"


class VerifySampling(TypedDict):
    """The request's sampling, sent when the server decides the round (``/info`` says ``server_decides``).

    The server applies it to the target's full distribution (decoding.sampling.logits_to_probs) and
    verifies the draft as a point mass (no drafter probabilities needed; exact for any proposal).
    ``seed`` seeds that round's draws (the client draws it from the request's generator).
    """

    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    seed: int  # 0 <= seed < 2**63


class VerifyRequest(TypedDict, total=False):
    """``POST VERIFY_PATH``: the context is ``stored[:base] + append``, then the k-token ``draft``.

    With ``sampling`` the server decides the round and answers the accepted tokens (``tokens``,
    ``accepted``); without it, it answers top-K rows and the client decides.
    """

    session: str  # client-chosen, see is_session_id
    base: int  # tokens of the stored context to keep; 0 starts (or restarts) the session
    append: list[int]  # tokens committed since the previous round
    draft: list[int]  # 0 <= k <= MAX_DRAFT
    top_k: int  # K, 1 <= K <= the server's max_logprobs (may be omitted with sampling)
    cache_salt: str | None  # the salt a previous answer returned for this session, or None
    sampling: VerifySampling  # the server decides the round


class DecidedResponse(TypedDict):
    """The answer to a request with ``sampling``: the round decided where the full distribution lives."""

    protocol: int
    server_id: str
    session: str
    context_len: int
    num_prompt_tokens: int
    num_cached_tokens: int
    recomputed: bool
    cache_salt: str | None
    tokens: list[int]  # draft[:accepted] + one correction (accepted < k) or bonus (accepted == k) token
    accepted: int  # 0 <= accepted <= k
    draft_logprobs: list[float]  # [k]: raw target logprob of each draft token (T = 1, no filters)
    engine_s: float


class VerifyResponse(TypedDict):
    """The answer: k+1 rows of the top-K (ids, logprobs) sorted by rank, and each draft token's own entry."""

    protocol: int
    server_id: str
    session: str
    context_len: int  # n, the stored context after this request
    num_prompt_tokens: int  # n + k
    num_cached_tokens: int  # vLLM prefix-cache hits of this request
    recomputed: bool  # a shared cache hit covered a needed row: recomputed under cache_salt
    cache_salt: str | None  # to send in the session's next rounds
    top_ids: list[list[int]]  # [k+1][K]
    top_logprobs: list[list[float]]  # [k+1][K], raw log-softmax, <= 0, non-increasing
    draft_logprobs: list[float]  # [k]: logprob of draft[i] in row i, even outside the top-K
    draft_ranks: list[int]  # [k]: its rank, 1 = best
    engine_s: float


class TokenizerResponse(TypedDict):
    """``GET TOKENIZER_PATH``: file name (one of TOKENIZER_FILES) -> its text, and the vocabulary's fingerprint."""

    vocab_sha256: str
    files: dict[str, str]


def is_session_id(value: object) -> bool:
    """1-128 characters of ``[A-Za-z0-9_-]``."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_ID_CHARS
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    )


def is_cache_salt(value: object) -> bool:
    """None, or 1-128 characters without ``@``, ``/``, ``\\`` or NUL (vLLM builds cache keys from it)."""
    return value is None or (
        isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS and not any(c in "@/\\\0" for c in value)
    )


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """SHA-256 of the vocabulary as ``[[token, id], ...]`` sorted by id (compact JSON, UTF-8).

    Client and server compute it from their own tokenizers: equal
    fingerprints mean the same token <-> id mapping.
    """
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
