"""Server-Sent Events: a job's chunks as OpenAI streams them, and the response that sends them.

``data: {json}\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` at the end. An error after
the first chunk is sent as ``data: {"error": {...}}`` followed by ``[DONE]``
(the stream is already 200 by then); the ``openai`` client raises it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from decoding.speculative import Chunk
from service.errors import APIError, to_api_error
from service.http import dumps
from service.jobs import ABORT, CHUNK, DONE, ClientGone, Job
from service.openai_responses import ChoiceOutput, LogprobsFormatter, ResponseBuilder, TandemStats, Usage, to_json

DONE_EVENT = b"data: [DONE]\n\n"


def event(data: bytes) -> bytes:
    """One Server-Sent Event carrying ``data`` (JSON, which has no raw newlines)."""
    return b"data: " + data + b"\n\n"


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of ready-made events.

    Closes the job whatever happens, so the generation and its slot never
    outlive the response.
    """

    media_type = "text/event-stream"

    def __init__(self, job: Job, body: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        self.job = job
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away
            pass
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.job.close()


async def stream_events(
    job: Job,
    first: tuple[str, int, Any],
    reply: ResponseBuilder,
    include_usage: bool,
    echo: list[str] | None = None,
    logprobs: LogprobsFormatter | None = None,
    tool_calls: Callable[[ChoiceOutput], None] | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI's streaming chunks for ``job``, starting with the already-received ``first`` event.

    One chunk per round that produced text, per choice; the chunk that finishes
    a choice carries its finish reason and ``tandem`` statistics. With ``tool_calls``
    (a chat request with tools) a choice's text is held until it ends, then sent as its
    tool calls (parsed by ``tool_calls``) or as content.
    """
    # Without include_usage, OpenAI's chunks have no "usage" key at all (with it: null until the last).
    exclude = None if include_usage else {"usage"}
    mode = job.plan.mode
    echo = list(echo or [""] * len(job.choices))
    offsets = [0] * len(job.choices)  # completions' text_offset, per choice
    held: list[list[str]] = [[] for _ in job.choices]  # a tool request's text, until its choice ends
    if reply.chat:  # OpenAI opens every chat choice with the assistant role
        for c in job.choices:
            yield event(to_json(reply.role_chunk(c.index, echo[c.index]), exclude))
        echo = [""] * len(job.choices)
    kind, index, payload = first
    while kind != DONE:
        if kind == CHUNK:
            c: Chunk = payload
            # Completions' echo comes with the choice's first chunk, its prompt logprobs too.
            text, echoed = echo[index] + c.text, echo[index]
            echo[index] = ""
            if tool_calls is not None:
                held[index].append(text)
                if c.finish_reason is None:
                    kind, index, payload = await job.next_event()
                    continue
                out = ChoiceOutput(text="".join(held[index]), finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                tool_calls(out)
                stats = TandemStats.of(mode, [c.stats])
                yield event(to_json(reply.chunk(index, out.text, out.finish_reason, stats, stop_reason=out.stop_reason,
                                                tool_calls=out.tool_calls), exclude))  # fmt: skip
                kind, index, payload = await job.next_event()
                continue
            lp = None
            if logprobs is not None and (c.logprobs or echoed):
                if reply.chat:
                    lp = logprobs.chat_logprobs(c.logprobs or [])
                else:
                    prompt = job.choices[index].prompt_ids if echoed and c.prompt_logprobs is not None else None
                    lp, offsets[index] = logprobs.completion(c.logprobs or [], offsets[index], prompt, c.prompt_logprobs)
            if c.finish_reason is not None:
                stats = TandemStats.of(mode, [c.stats])
                yield event(to_json(reply.chunk(index, text, c.finish_reason, stats, stop_reason=c.stop_reason,
                                                logprobs=lp), exclude))  # fmt: skip
            elif text or lp is not None:
                yield event(to_json(reply.chunk(index, text, logprobs=lp), exclude))
        else:
            if not (kind == ABORT and payload in ("disconnect", "closed")):
                err = _error_of(kind, payload, job.record.request_id)
                job.record.error = err
                yield event(dumps(err.body()))
            yield DONE_EVENT
            return
        kind, index, payload = await job.next_event()
    if job.gw.settings.log_prompts:
        job.record.output = job.outputs
    if include_usage:
        usage = Usage.of(job.prompt_tokens, job.completion_tokens, job.cached_tokens)
        yield event(to_json(reply.usage_chunk(usage, TandemStats.of(mode, job.choice_stats))))
    yield DONE_EVENT


def _error_of(kind: str, payload: Any, request_id: str) -> APIError:
    """The error event for an ERROR or ABORT event of the job."""
    try:
        Job.raise_for(kind, payload)
    except ClientGone:
        return APIError(499, "client closed the request", code="client_closed")
    except Exception as exc:
        return to_api_error(exc, request_id)
    return APIError(500, "unknown event", "server_error")  # pragma: no cover
