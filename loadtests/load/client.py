"""One streamed OpenAI request, timed as ``vllm bench serve`` times it, and its record."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtests.load.config import RunConfig
from loadtests.load.workload import Prompt, TokenCounter


@dataclass
class RequestResult:
    start: float  # seconds from the start of the run to sending the request
    status: str  # "200" when successful; an HTTP status, "timeout", "connect_error", "stream_error", ...
    latency: float  # seconds from sending to the end of the response (e2e for successes)
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def success(self) -> bool:
        return self.status == "200"

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def request_body(cfg: RunConfig, model: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": cfg.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


async def send_request(
    client: httpx.AsyncClient, cfg: RunConfig, model: str, prompt: Prompt, t_run: float, tok: TokenCounter | None
) -> RequestResult:
    """One streamed request, timed as ``vllm bench serve`` times it."""
    st = time.perf_counter()
    result = RequestResult(start=st - t_run, status="", latency=0.0, prompt_tokens=prompt.tokens)
    text_parts: list[str] = []
    usage_tokens: int | None = None
    done = False
    try:
        async with client.stream("POST", cfg.endpoint, json=request_body(cfg, model, prompt)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.status = str(resp.status_code)
                result.latency = time.perf_counter() - st
                try:
                    result.error = json.loads(body)["error"]["message"][:300]
                except (ValueError, KeyError, TypeError):
                    result.error = body[:300]
                return result
            last = st
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    result.status = "stream_error"
                    result.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                    result.latency = time.perf_counter() - st
                    return result
                if choices := chunk.get("choices"):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - st
                    else:
                        result.itl.append(now - last)
                    last = now
                    c = choices[0]
                    text_parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
                elif usage := chunk.get("usage"):
                    usage_tokens = usage.get("completion_tokens")
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_tokens = usage["prompt_tokens"]
        result.latency = time.perf_counter() - st
        if not done:
            result.status, result.error = "truncated", "the stream ended without data: [DONE]"
            return result
        result.status = "200"
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        elif tok is not None:
            result.output_tokens = len(tok.encode("".join(text_parts)))
        else:
            result.output_tokens = len(result.itl) + (result.ttft is not None)
    except httpx.TimeoutException as exc:
        result.status, result.error = "timeout", f"{type(exc).__name__} after {time.perf_counter() - st:.1f}s"
    except httpx.ConnectError as exc:
        result.status, result.error = "connect_error", str(exc)[:300]
    except (httpx.HTTPError, ValueError) as exc:  # protocol errors, bad JSON in the stream
        result.status, result.error = "protocol_error", f"{type(exc).__name__}: {exc}"[:300]
    if not result.latency:
        result.latency = time.perf_counter() - st
    return result


def resolve_model(client: httpx.Client) -> str:
    resp = client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]
