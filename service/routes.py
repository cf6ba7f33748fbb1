"""The gateway's routes: the two OpenAI generation routes, models, health, readiness and metrics.

A generation request goes through, in order: authentication (middleware,
``/v1/*`` only), schema validation (400 on failure), :func:`plan_request`
(model, parameters, tokenization, context: 404/400), admission (a slot, a
place in the queue, or 429), then the job's producers, whose events the
response (JSON or Server-Sent Events) drains.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from decoding.verifiers import VerifierUnavailableError
from service.admission import ShuttingDownError
from service.errors import APIError, bad_request, error_response
from service.backends import Backends
from service.gateway import Gateway
from service.http import dumps
from service.jobs import ABORT, ERROR, ClientGone, Job
from service.logs import RequestRecord
from service.middleware import prepared
from service.metrics import CONTENT_TYPE
from service.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    render_chat,
)
from service.openai_responses import (
    ChatCompletionResponse,
    ChoiceOutput,
    CompletionResponse,
    ErrorResponse,
    LogprobsFormatter,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    TokenizeResponse,
    ResponseBuilder,
    TandemStats,
    Usage,
    to_json,
)
from service.plan import Plan, plan_request
from service.tools import NamedToolChoice, parse_tool_calls
from service.sse import EventStreamResponse, stream_events

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid parameter (param names it), or context length exceeded"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when keys are configured)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Verifier unavailable or shutting down; see Retry-After"},
    504: {"model": ErrorResponse, "description": "Request timeout"},
}


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _not_ready() -> APIError:
    return APIError(503, "the models are still loading", "service_unavailable_error", code="not_ready",
                    headers={"Retry-After": "5"})  # fmt: skip


@router.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    summary="Create a completion (OpenAI-compatible)",
)
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await generate(request, body, chat=False)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    summary="Create a chat completion (OpenAI-compatible)",
)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    return await generate(request, body, chat=True)


async def generate(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
    """Plan the request, admit it, run its choices; answer with JSON or, once the first round succeeded, SSE."""
    gw = _gateway(request)
    record: RequestRecord = request.scope["tandem.record"]
    record.stream, record.n = bool(body.stream), body.n or 1
    if gw.backends is None:
        raise _not_ready()
    plan = await plan_request(body, gw.settings, gw.backends, record)
    echo = _echo_prefixes(body, plan, gw.backends.tokenizer)
    prepared(request.scope)  # the next request may be read and planned while this one waits for a slot
    job = Job(gw, plan, request.receive, record)
    role = body.response_role if isinstance(body, ChatCompletionRequest) else "assistant"
    formatter = None
    if body.logprobs is not None and body.logprobs is not False:
        formatter = LogprobsFormatter(gw.backends.tokenizer, chat, bool(body.return_tokens_as_token_ids))
    reply = ResponseBuilder.for_request(chat, gw.settings.model_name, gw.fingerprint, body.request_id, role)
    handed_off = False
    try:
        await job.admit()
        job.start()
        if body.stream:
            # Errors before the first round are ordinary HTTP errors: the stream starts once a round succeeded.
            first = await job.next_event()
            if first[0] in (ERROR, ABORT):
                job.raise_for(first[0], first[2])
            handed_off = True
            tools = _tool_calls if chat and body.effective_tool_choice != "none" else None
            events = stream_events(job, first, reply, body.include_usage, echo, formatter,
                                   (lambda out: tools(out, body)) if tools else None)  # fmt: skip
            return EventStreamResponse(job, events)
        await job.wait()
    except ClientGone:
        return error_response(APIError(499, "client closed the request", code="client_closed"))
    finally:
        if not handed_off:
            job.close()

    texts = job.outputs
    if gw.settings.log_prompts:
        record.output = texts
    outputs = [
        ChoiceOutput(text=prefix + text, finish_reason=finish, stop_reason=stop)
        for prefix, text, finish, stop in zip(echo, texts, job.finish, job.stop_reasons, strict=True)
    ]
    if chat and body.effective_tool_choice != "none":
        for out in outputs:
            _tool_calls(out, body)
    if formatter is not None:
        for i, out in enumerate(outputs):
            if chat:
                out.logprobs = formatter.chat_logprobs(job.logprobs[i])
            else:
                prompt = plan.choices[i].prompt_ids if body.echo else None
                out.logprobs, _ = formatter.completion(job.logprobs[i], 0, prompt, job.prompt_logprobs[i])
    usage = Usage.of(plan.prompt_tokens, job.completion_tokens, job.cached_tokens)
    response = reply.response(outputs, usage, TandemStats.of(plan.mode, job.choice_stats))
    return Response(to_json(response), media_type="application/json")


def _tool_calls(out: ChoiceOutput, body: ChatCompletionRequest) -> None:
    """Parse the calls out of a finished choice; its finish reason becomes tool_calls when the model chose
    to call (auto, required), as vLLM reports it."""
    content, calls = parse_tool_calls(out.text, body.tools or [], body.effective_tool_choice)
    if calls:
        out.text, out.tool_calls = content or "", calls
        if out.finish_reason == "stop" and not isinstance(body.effective_tool_choice, NamedToolChoice):
            out.finish_reason = "tool_calls"


def _echo_prefixes(body: CompletionRequest | ChatCompletionRequest, plan: Plan, tokenizer: Any) -> list[str]:
    """Per choice, the text ``echo`` puts before the output: the prompt (completions), or the final
    message when it has the response's role (chat, as vLLM does); '' without echo."""
    if not body.echo:
        return [""] * len(plan.choices)
    if isinstance(body, ChatCompletionRequest):
        return [body.echo_prefix()] * len(plan.choices)
    prompts, n = body.prompts(), body.n or 1
    texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    return [texts[c.index // n] for c in plan.choices]


def _model_card(gw: Gateway) -> ModelCard:
    card = ModelCard(id=gw.settings.model_name, created=gw.created, owned_by="tandem", permission=[ModelPermission()])
    if gw.backends is not None:
        card.root = gw.backends.verifier.name
        card.max_model_len = gw.backends.verifier.max_context
    return card


@router.get("/v1/models", response_model=ModelList, summary="List the served model")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(_gateway(request))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: ERROR_RESPONSES[404]})
async def get_model(request: Request, model_id: str) -> ModelCard:
    gw = _gateway(request)
    if model_id != gw.settings.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found",
                       reason="not_found")  # fmt: skip
    return _model_card(gw)


# -- vLLM's tooling routes ------------------------------------------------------------------------


def _check_model(gw: Gateway, model: str | None) -> Backends:
    if model is not None and model != gw.settings.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {gw.settings.model_name!r}",
                       param="model", code="model_not_found", reason="not_found")  # fmt: skip
    if gw.backends is None:
        raise _not_ready()
    return gw.backends


@router.post("/tokenize", response_model=TokenizeResponse, responses={400: ERROR_RESPONSES[400], 404: ERROR_RESPONSES[404]},
             summary="Tokenize a prompt, or chat messages through the chat template (vLLM's route)")  # fmt: skip
async def tokenize(request: Request, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    gw = _gateway(request)
    backends = _check_model(gw, body.model)
    tokenizer = backends.tokenizer
    if isinstance(body, TokenizeChatRequest):
        text, special = render_chat(tokenizer, body.as_chat_request())
    else:
        text, special = body.prompt, body.add_special_tokens
    # Off the event loop: a long prompt takes a while to tokenize.
    ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=special)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=backends.verifier.max_context, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses={400: ERROR_RESPONSES[400], 404: ERROR_RESPONSES[404]},
             summary="Turn token ids back into text (vLLM's route)")  # fmt: skip
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    backends = _check_model(_gateway(request), body.model)
    vocab = backends.verifier.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=backends.tokenizer.decode(body.tokens))


@router.get("/version", summary="The server's version (vLLM's route)")
async def version(request: Request) -> dict[str, str]:
    return {"version": request.app.version}


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: models loaded and the verifier answering", responses={503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> Response:
    gw = _gateway(request)
    if gw.draining:
        raise ShuttingDownError("the server is shutting down")
    if gw.backends is None:
        raise _not_ready()
    body = {"status": "ready", "model": gw.settings.model_name}
    split_router = gw.backends.split_router
    try:
        await asyncio.wait_for(gw.backends.verifier.check_ready(), timeout=10)
        if split_router is not None:
            try:
                await asyncio.wait_for(split_router.verifier.check_ready(), timeout=10)
                body["split_worker"] = "ready"
            except (VerifierUnavailableError, TimeoutError):
                # Only private requests need the worker: unless every request does, the gateway
                # stays in rotation for the others and says what is missing.
                if gw.settings.split_policy == "always":
                    raise
                body["split_worker"] = "unavailable"
    except (VerifierUnavailableError, TimeoutError) as exc:
        gw.metrics.verifier_errors.labels("unavailable" if isinstance(exc, VerifierUnavailableError) else "timeout").inc()
        raise VerifierUnavailableError(str(exc) or "the readiness check timed out") from None
    return Response(dumps(body), media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(_gateway(request).metrics.render(), media_type=CONTENT_TYPE)
