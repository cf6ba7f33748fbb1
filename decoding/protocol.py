"""The split transport's binary frame: a small header, then one raw tensor.

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
"""

from __future__ import annotations

import json
import math
import struct
import sys

import torch

MAGIC = b"TSPL"
VERSION = 1
CONTENT_TYPE = "application/x-tandem-split"
MAX_HEADER_BYTES = 4096
_PREFIX = struct.Struct("<4sHI")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("the split wire format assumes a little-endian host")


class WireError(ValueError):
    """A malformed frame; the message says what is wrong."""


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
    try:
        header = json.loads(data[_PREFIX.size : end])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
