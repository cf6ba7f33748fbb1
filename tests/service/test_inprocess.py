"""The app in-process (real uvicorn on a thread, official client) for what a healthy subprocess cannot show:
an unexpected failure inside the decoding core (500, no traceback), before and during a stream.
Plus unit tests of admission control."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest
import torch
import uvicorn

from decoding.speculative import SpecOptions, SpeculativeRouter
from service.admission import Admission, QueueFullError, ShuttingDownError
from service.app import create_app
from service.backends import Backends
from service.config import TandemSettings
from tests.service.conftest import free_port

SECRET = "secret-internal-detail-42"


class FaultyVerifierForTest:
    """A stand-in verifier (a fake, on purpose) whose score() raises an unexpected error on call ``fail_at``.

    A healthy in-process verifier never fails like this; the fake is how the 500 path is reached.
    """

    name = "faulty-test-verifier"

    def __init__(self, vocab_size: int, fail_at: int, token: int):
        self.vocab_size = vocab_size
        self.token = token
        self.max_context = 512
        self.fail_at = fail_at
        self.calls = 0

    async def start(self, prompt_ids: Sequence[int]) -> FaultyVerifierForTest:
        return self

    forward_passes = 0
    last_transport = None  # in process: nothing crosses a network

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError(SECRET)
        logits = torch.zeros(len(draft) + 1, self.vocab_size)
        logits[:, self.token] = 10.0  # always the same ordinary token, never EOS
        return logits

    def extend(self, tokens: Sequence[int]) -> None:
        pass

    async def close(self) -> None:
        pass

    async def check_ready(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class ThreadedServer:
    """uvicorn serving an app on a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-process server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def faulty_server(tiny_verifier_dir, request) -> Iterator[tuple[ThreadedServer, FaultyVerifierForTest]]:
    from decoding.causal_lm import load_tokenizer

    tokenizer = load_tokenizer(tiny_verifier_dir)
    verifier = FaultyVerifierForTest(len(tokenizer), fail_at=request.param, token=tokenizer.encode("a")[0])
    options = SpecOptions(mode="verifier-only")
    router = SpeculativeRouter(verifier, None, tokenizer, options, "torch")
    settings = TandemSettings.load(mode="verifier-only")
    app = create_app(settings, Backends(router=router, verifier=verifier, drafter=None, tokenizer=tokenizer))
    with ThreadedServer(app) as srv:
        yield srv, verifier


@pytest.mark.parametrize("faulty_server", [1], indirect=True)
def test_unexpected_failure_is_500_without_details(faulty_server):
    srv, _ = faulty_server
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            r = client.completions.create(model="tandem", prompt="hello", max_tokens=5, stream=stream)
            list(r) if stream else None
        assert info.value.status_code == 500
        body = info.value.body
        assert body["type"] == "server_error"
        assert SECRET not in body["message"] and "Traceback" not in body["message"]
        assert "request id" in body["message"]
    # the server lives on
    assert httpx.get(srv.base_url + "/health").status_code == 200


@pytest.mark.parametrize("faulty_server", [4], indirect=True)
def test_failure_mid_stream_sends_an_error_event(faulty_server):
    srv, _ = faulty_server
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    received = []
    with pytest.raises(openai.APIError) as info:
        stream = client.completions.create(model="tandem", prompt="hello", max_tokens=50, stream=True, temperature=0)
        for chunk in stream:
            received.append(chunk.choices[0].text)
    # Greedy: at the default temperature 1 a round could sample a token (p ~ 2%) whose text is held
    # back (half a UTF-8 character) or empty, and the count would vary.
    assert len(received) == 3  # three good rounds, then the error event
    assert SECRET not in str(info.value)
    metrics = httpx.get(srv.base_url + "/metrics").text
    assert 'tandem_requests_finished_total{finished_reason="error",mode="verifier-only"} 1.0' in metrics
    assert "tandem_requests_running 0.0" in metrics


# -- admission control --------------------------------------------------------------------------------------


def test_admission_fifo_queue_limit_and_cancellation():
    async def scenario():
        adm = Admission(max_concurrency=2, max_queue=2)
        a = await adm.acquire()
        b = await adm.acquire()
        assert adm.in_use == 2
        order = []

        async def waiter(name):
            slot = await adm.acquire()
            order.append(name)
            return slot

        w1 = asyncio.ensure_future(waiter("w1"))
        w2 = asyncio.ensure_future(waiter("w2"))
        await asyncio.sleep(0)
        assert adm.waiting == 2
        with pytest.raises(QueueFullError) as info:
            await adm.acquire()
        assert info.value.retry_after_s >= 1
        w1.cancel()  # a cancelled waiter leaves the queue
        await asyncio.sleep(0)
        assert adm.waiting == 1
        a.release()
        slot2 = await w2
        assert order == ["w2"] and adm.in_use == 2
        b.release()
        slot2.release()
        slot2.release()  # idempotent
        assert adm.in_use == 0

    asyncio.run(scenario())


def test_admission_weights_and_close():
    async def scenario():
        adm = Admission(max_concurrency=3, max_queue=4)
        big = await adm.acquire(weight=10)  # capped at the capacity
        assert big.weight == 3 and adm.in_use == 3
        small = asyncio.ensure_future(adm.acquire(1))
        await asyncio.sleep(0)
        assert adm.waiting == 1
        adm.close()
        with pytest.raises(ShuttingDownError):
            await small
        with pytest.raises(ShuttingDownError):
            await adm.acquire()
        big.release()
        assert adm.in_use == 0

    asyncio.run(scenario())


# -- the request log line ----------------------------------------------------------------------------------


def test_request_log_line_keeps_prompts_out_unless_asked():
    import json
    import logging

    from service.logs import JSONFormatter, RequestRecord, TextFormatter

    record = RequestRecord(request_id="r1", method="POST", path="/v1/completions", status=200, route="/v1/completions",
                           mode="speculative", prompt_tokens=5, completion_tokens=7, prompt="secret prompt",
                           output=["secret output"])  # fmt: skip
    private = record.fields(log_prompts=False)
    assert private["request_id"] == "r1" and private["status"] == 200 and private["completion_tokens"] == 7
    assert "prompt" not in private and "output" not in private
    shared = record.fields(log_prompts=True)
    assert shared["prompt"] == "secret prompt" and shared["output"] == ["secret output"]

    log_record = logging.LogRecord("tandem.access", logging.INFO, __file__, 1, "request", None, None)
    log_record.fields = private
    line = json.loads(JSONFormatter().format(log_record))
    assert line["msg"] == "request" and line["route"] == "/v1/completions" and line["level"] == "info"
    text = TextFormatter().format(log_record)
    assert "request_id=r1" in text and "status=200" in text and "secret" not in text
