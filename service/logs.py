"""Structured logs: one line per request, optionally JSON.

The request line carries its id, method, route, status, mode, token counts and
latencies. Prompts and outputs are private: they appear only with
``log_prompts: true``, and the ``user`` field never does.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ACCESS_LOGGER = "tandem.access"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: msg key=value ...``, one physical line per record.

    Every part is escaped, because parts of it come from requests (an unknown
    field's name in ``error_param``, an exception's message): control
    characters in the message become ``\\r``-style escapes, a field key or
    value that is not a plain token is written as a JSON string (ASCII, quoted),
    and a traceback's lines are indented. So no request can start a line of its
    own, and ``key=value`` pairs parse unambiguously.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape_controls(self.formatMessage(record))
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += "".join(f" {_text_token(str(k))}={_text_value(v)}" for k, v in fields.items() if v is not None)
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for text in extra:  # indented: a line of a traceback never starts where a record does
            line += "".join(f"\n    {escape_controls(t)}" for t in text.splitlines())
        return line


#: A key or value written as is; anything else is quoted and escaped.
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+\-\[\]]+")
#: C0 and C1 controls and the Unicode line and paragraph separators (some viewers break lines there too).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character as a visible escape (``\\r``, ``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROLS.sub(lambda m: json.dumps(m.group())[1:-1], text)


def _text_token(s: str) -> str:
    return s if _PLAIN.fullmatch(s) else json.dumps(s, ensure_ascii=True)


def _text_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, bool | int):
        return str(v)
    return _text_token(v if isinstance(v, str) else str(v))


class RateLimitFilter(logging.Filter):
    """At most one record per ``interval_s`` for each kind of flood-prone warning; the next one let through says
    how many were dropped. A record's kind is its ``rate_limit`` attribute (``extra={"rate_limit": "accept"}``),
    or for uvicorn's per-connection warnings, which tandem cannot tag, its message.

    A flood of bad connections (or of accept errors when file descriptors run out) must not become a flood
    of log: unlimited, one such warning per connection wrote 19 MB in 6 s.
    """

    UVICORN = {"Invalid HTTP request received.": "invalid_http_request", "Exceeded concurrency limit.": "concurrency"}

    def __init__(self, interval_s: float = 10.0):
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (when one was let through, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = getattr(record, "rate_limit", None) or (self.UVICORN.get(record.msg) if isinstance(record.msg, str) else None)
        if kind is None:
            return True
        now = time.monotonic()
        last, dropped = self._last.get(kind, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._last[kind] = (last, dropped + 1)
            return False
        self._last[kind] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last {now - last:.0f}s)"
        return True


def configure_logging(level: str = "info", json_lines: bool = False, stream: Any = None) -> None:
    """Route tandem's and uvicorn's loggers to one handler on stderr (flood-prone warnings rate-limited)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("tandem", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(level.upper())
    # The per-request line below replaces uvicorn's access log.
    logging.getLogger("uvicorn.access").disabled = True


@dataclass
class RequestRecord:
    """What the request log line and the request metrics need; filled in as the request runs."""

    request_id: str
    method: str
    path: str
    t_start: float = field(default_factory=time.perf_counter)
    status: int | None = None
    route: str = "other"
    mode: str = ""
    stream: bool | None = None
    n: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    queue_s: float | None = None
    aborted: str | None = None  # disconnect, timeout, shutdown
    error: Any = None  # service.errors.APIError
    prompt: Any = None  # only kept when log_prompts
    output: Any = None

    def fields(self, log_prompts: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "latency_s": round(time.perf_counter() - self.t_start, 6),
        }
        if self.mode:
            out["mode"] = self.mode
        for name in ("stream", "n", "prompt_tokens", "completion_tokens", "ttft_s", "queue_s", "aborted"):
            value = getattr(self, name)
            if value is not None:
                out[name] = round(value, 6) if isinstance(value, float) else value
        if self.finish_reasons:
            out["finish_reason"] = ",".join(sorted(set(self.finish_reasons)))
        if self.error is not None:
            out["error_type"] = self.error.type
            if self.error.code:
                out["error_code"] = self.error.code
            if self.error.param:
                out["error_param"] = self.error.param
        if log_prompts:
            if self.prompt is not None:
                out["prompt"] = self.prompt
            if self.output is not None:
                out["output"] = self.output
        return out


def log_request(record: RequestRecord, log_prompts: bool = False) -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    if logger.isEnabledFor(logging.INFO):
        logger.info("request", extra={"fields": record.fields(log_prompts)})
