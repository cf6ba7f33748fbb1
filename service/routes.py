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
from service.errors import APIError, error_response
from service.gateway import Gateway
from service.http import dumps
from service.jobs import ABORT, ERROR, ClientGone, Job
from service.logs import RequestRecord
from service.middleware import prepared
from service.metrics import CONTENT_TYPE
from service.openai_api import ChatCompletionRequest, CompletionRequest
from service.openai_responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponseBuilder,
    TandemStats,
    Usage,
    to_json,
)
from service.plan import plan_request
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
    prepared(request.scope)  # the next request may be read and planned while this one waits for a slot
    job = Job(gw, plan, request.receive, record)
    reply = ResponseBuilder.for_request(chat, gw.settings.model_name, gw.fingerprint)
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
            return EventStreamResponse(job, stream_events(job, first, reply, body.include_usage))
        await job.wait()
    except ClientGone:
        return error_response(APIError(499, "client closed the request", code="client_closed"))
    finally:
        if not handed_off:
            job.close()

    outputs = job.outputs
    if gw.settings.log_prompts:
        record.output = outputs
    usage = Usage.of(plan.prompt_tokens, job.completion_tokens)
    response = reply.response(outputs, job.finish, usage, TandemStats.of(plan.mode, job.choice_stats))
    return Response(to_json(response), media_type="application/json")


def _model_card(gw: Gateway) -> ModelCard:
    card = ModelCard(id=gw.settings.model_name, created=gw.created, owned_by="tandem")
    if gw.backends is not None:
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
