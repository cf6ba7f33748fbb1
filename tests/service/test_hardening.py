"""Hardening (issue 15): what an attacker or a careless operator can do to a gateway, and what it must do back.

Numerics of tiny temperature / top_p, auth that cannot silently turn off, log injection, bounded memory per
request, connection limits, and protocol errors in OpenAI's envelope.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time

import httpx
import pytest

from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from tests.support.gateway import Gateway, model_args, start_server, wait_until_up

PROMPT = "def fib(n):\n"
TINY = [1e-45, 5e-324, 1e-300]


# -- numerics: tiny positive temperature and top_p are their limits, greedy and top-1 ------------------------------


@pytest.mark.parametrize("mode", ["speculative", "verifier-only"])
def test_tiny_temperature_and_top_p_are_greedy_through_the_router(mode, tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    options = SpecOptions(mode=mode)
    ids = tiny_tokenizer.encode(PROMPT)

    def tokens(**params) -> list[int]:
        return asyncio.run(router.generate(ids, SamplingParams(max_tokens=24, ignore_eos=True, **params), options)).token_ids

    greedy = tokens(temperature=0.0)
    for tiny in TINY:
        assert tokens(temperature=tiny, seed=1) == greedy, f"temperature={tiny}"
        assert tokens(temperature=1.0, top_p=tiny, seed=2) == greedy, f"top_p={tiny}"


def test_tiny_temperature_and_top_p_are_greedy_over_http(server):
    def text(**params) -> str:
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, **params}
        r = server.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    for tiny in TINY:
        assert text(temperature=tiny, seed=3) == greedy, f"temperature={tiny}"
        assert text(top_p=tiny, seed=4) == greedy, f"top_p={tiny}"
        assert text(temperature=tiny, stream=False, tandem={"mode": "verifier-only"}) == greedy


# -- auth cannot silently turn off -------------------------------------------------------------------------------


SECRET = "sk-live-abcdefghijklmnop"  # a real-looking key that must never be echoed


@pytest.mark.parametrize(
    "argv,env,says",
    [
        (["--api-key", ""], {}, "empty or whitespace"),  # `--api-key "$KEY"` with KEY unset
        (["--api-key", "   "], {}, "empty or whitespace"),
        ([], {"TANDEM_API_KEYS": ""}, "empty or whitespace"),
        ([], {"TANDEM_API_KEYS": f"{SECRET},,{SECRET}x"}, "key 2 of 3 is empty"),
        (["--api-key", SECRET[:15]], {}, "at least 16"),
        (["--api-key", f" {SECRET}"], {}, "whitespace"),
        (["--split-token", " "], {}, "split_token"),
    ],
)
def test_an_empty_whitespace_or_short_key_is_a_startup_error_naming_the_setting(argv, env, says, monkeypatch, capsys):
    from service.cli import main

    for key in [k for k in __import__("os").environ if k.startswith("TANDEM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", *argv]) == 2  # fails before loading any model
    err = capsys.readouterr().err
    assert err.startswith("tandem serve: error: invalid setting ") and says in err and "Traceback" not in err, err
    assert ("'split_token'" if "--split-token" in argv else "'api_keys'") in err
    assert SECRET[:15] not in err  # the rejected key is not echoed


def test_a_short_key_needs_allow_weak_keys(monkeypatch):
    from service.config import TandemSettings

    monkeypatch.delenv("TANDEM_API_KEYS", raising=False)
    settings = TandemSettings.load(api_keys=["short-key"], allow_weak_keys=True)
    assert [k.get_secret_value() for k in settings.api_keys] == ["short-key"]


def test_the_startup_log_states_how_many_keys_are_active(limited_server):
    from tests.service.conftest import LIMITED_KEY, LIMITED_OTHER_KEY

    log = limited_server.log()
    assert "auth on (2 API keys active)" in log
    assert LIMITED_KEY not in log and LIMITED_OTHER_KEY not in log


# -- logs: no request can forge a line ---------------------------------------------------------------------------------


FORGED = "FORGED7c1e status=200"


def test_cr_and_lf_in_a_field_name_cannot_forge_a_log_line(server):
    # An unknown field of the tandem object is a 400 whose error_param, logged, is the field's name.
    for name in (f"x\rstatus=200\n{FORGED}", f"y\n{FORGED}", f"z\u2028{FORGED}", f"w\x1b\r{FORGED}"):
        r = server.http.post("/v1/completions", json={"model": "tandem", "prompt": "x", "tandem": {name: 1}})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("tandem."), r.text
    server.http.get("/health")  # one more line after them
    log = server.log()
    lines = log.splitlines()  # splits at \r, \n, \x1c-\x1e, \x85, \u2028 and \u2029 too
    assert not [line for line in lines if line.startswith(FORGED)]
    logged = [line for line in lines if "error_param=" in line and "FORGED7c1e" in line]
    assert len(logged) == 4, logged
    assert all('error_param="tandem.' in line for line in logged)


def test_every_part_of_a_text_log_line_is_escaped():
    import logging
    import sys

    from service.logs import JSONFormatter, TextFormatter

    record = logging.LogRecord("tandem.access", logging.INFO, __file__, 1, "request %s", (f"a\r{FORGED}",), None)
    record.fields = {"error_param": f"p\n{FORGED}", f"k\r{FORGED}": "v", "status": 400, "route": "/v1/completions"}
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1 and " status=400 " in line and " route=/v1/completions" in line
    assert 'error_param="p\\nFORGED7c1e status=200"' in line and '"k\\rFORGED7c1e status=200"=v' in line
    try:
        raise ValueError(f"boom\n{FORGED}")
    except ValueError:
        record = logging.LogRecord("tandem", logging.ERROR, __file__, 1, "unhandled", (), sys.exc_info())
    text = TextFormatter().format(record)
    assert all(not line.startswith(FORGED) for line in text.splitlines()) and "\n    ValueError: boom" in text
    for json_line in (JSONFormatter().format(record),):
        assert len(json_line.splitlines()) == 1


# -- connections --------------------------------------------------------------------------------------------------


MAX_CONNECTIONS = 16
HEADER_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 8192


@pytest.fixture(scope="module")
def guarded(tiny_pair, tmp_path_factory):
    """A gateway with small connection limits (and, below, small request limits)."""
    root = tmp_path_factory.mktemp("guarded")
    s = start_server(
        root / "serve.log", *model_args(*tiny_pair), "--max-connections", str(MAX_CONNECTIONS),
        "--header-timeout-s", str(HEADER_TIMEOUT_S), "--keep-alive-s", "5", "--max-header-bytes", str(MAX_HEADER_BYTES),
        "--body-timeout-s", "2",
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log_tail()


def raw_connection(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError if it does not)."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def is_closed(sock: socket.socket) -> bool:
    """True when the server has closed ``sock`` (EOF or reset); False while it is open and silent."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def health_latency(server) -> float:
    t0 = time.perf_counter()
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    return time.perf_counter() - t0


def test_a_request_head_that_never_completes_is_closed_after_the_header_timeout(guarded):
    silent = raw_connection(guarded)
    slow = raw_connection(guarded, b"GET /health HTTP/1.1\r\n")
    t0 = time.monotonic()
    for _ in range(int(HEADER_TIMEOUT_S / 0.25) + 8):  # slowloris: a header byte every 0.25 s, for longer than allowed
        try:
            slow.send(b"X")
        except OSError:
            break
        time.sleep(0.25)
    assert read_all(slow) == b"" and read_all(silent) == b""  # closed, no response: no request to answer
    assert HEADER_TIMEOUT_S - 0.1 <= time.monotonic() - t0 <= HEADER_TIMEOUT_S + 3
    # A keep-alive connection gets the same deadline for its next request.
    sock = raw_connection(guarded, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    sock.settimeout(10)
    response = b""
    while b'{"status":"ok"}' not in response:
        response += sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next head starts, and stalls
    t0 = time.monotonic()
    assert read_all(sock) == b"" and time.monotonic() - t0 <= HEADER_TIMEOUT_S + 1


def test_open_connections_are_capped_and_idle_ones_cannot_keep_a_probe_out(guarded):
    idle = [raw_connection(guarded) for _ in range(4 * MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        assert sum(not is_closed(s) for s in idle) <= MAX_CONNECTIONS
        fds = len(os.listdir(f"/proc/{guarded.proc.pid}/fd"))
        assert fds < MAX_CONNECTIONS + 100, fds
        # Each probe's new connection takes the place of the idle connection that waited longest.
        latencies = sorted(health_latency(guarded) for _ in range(20))
        assert latencies[-1] < 1.0, latencies
        # Connections with a request in flight are never the ones closed.
        r = guarded.client().completions.create(model="tandem", prompt="x", max_tokens=4)
        assert r.choices[0].text is not None
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nbad header line\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        [b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ", *[b"a" * 1024] * 12, b"\r\n\r\n"],  # in pieces
    ],
    ids=["request-line", "header-line", "content-length", "two-content-lengths", "head-too-large"],
)
def test_protocol_errors_are_openai_error_objects(guarded, raw):
    sock = raw_connection(guarded)
    for piece in raw if isinstance(raw, list) else [raw]:
        try:
            sock.sendall(piece)
        except OSError:  # refused half-way: the answer is already there
            break
        time.sleep(0.02)
    assert_error_response(read_all(sock), 400, "invalid_http_request")


def test_a_head_over_max_header_bytes_in_one_piece_is_431(guarded):
    head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\nConnection: close\r\n\r\n"
    assert_error_response(read_all(raw_connection(guarded, head)), 431, "request_header_fields_too_large")


def assert_error_response(response: bytes, status: int, code: str) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"content-type: application/json" in head.lower(), response[:300]
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code and err["message"], err
    return err


#: Exec a command under a file-descriptor limit (soft = hard = argv[1]).
UNDER_NOFILE = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"


def test_out_of_file_descriptors_the_gateway_answers_and_its_log_stays_small(tiny_pair, tmp_path):
    """As probed: a 256 file-descriptor limit and 320 idle connections (then: /health timed out and 19 MB of
    'Too many open files' in 6 s)."""
    g = Gateway((*model_args(*tiny_pair), "--max-connections", "100", "--header-timeout-s", "30"), log_path=tmp_path / "serve.log")
    g.cmd = [sys.executable, "-c", UNDER_NOFILE, "256", *g.cmd]
    g.spawn()
    idle: list[socket.socket] = []
    try:
        wait_until_up(g, "/ready")
        log_before = len(g.log())
        for _ in range(320):
            try:
                idle.append(socket.create_connection(("127.0.0.1", g.port), timeout=5))
            except OSError:
                pass
        assert health_latency(g) < 5  # answered during the flood (accept may be backing off for 1 s)
        time.sleep(1.5)
        latencies = sorted(health_latency(g) for _ in range(20))
        assert latencies[-1] < 1.0, latencies
        assert len(os.listdir(f"/proc/{g.proc.pid}/fd")) <= 256
        assert len(g.log()) - log_before < 20_000, g.log()[log_before:][-3000:]
        assert "connection limit reached (max_connections=100)" in g.log()
    finally:
        for s in idle:
            s.close()
        assert g.stop() == 0, g.log_tail()


def test_a_connection_limit_beyond_the_file_limit_is_a_startup_error(tiny_pair, tmp_path):
    g = Gateway((*model_args(*tiny_pair), "--max-connections", "1000"), log_path=tmp_path / "serve.log")
    g.cmd = [sys.executable, "-c", UNDER_NOFILE, "256", *g.cmd]
    assert g.spawn().proc.wait(120) == 2
    assert "invalid setting 'max_connections'" in g.log() and "RLIMIT_NOFILE" in g.log()


def test_after_sigterm_idle_keep_alive_connections_are_closed_cleanly(tiny_pair, tmp_path):
    g = start_server(tmp_path / "serve.log", *model_args(*tiny_pair), "--shutdown-grace", "2")
    idle = raw_connection(g, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    response = b""
    while b'{"status":"ok"}' not in response:
        response += idle.recv(65536)
    busy: dict = {}

    def stream() -> None:
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", g.base_url + "/v1/completions", json=body, timeout=60) as r:
            busy["connection"] = r.headers.get("connection")
            busy["text"] = "".join(r.iter_text())

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    g.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert read_all(idle, timeout=5) == b""  # closed, without a byte of response: safe for the client to retry
    assert time.monotonic() - t0 < 2
    t.join(30)
    assert busy["text"].rstrip().endswith("data: [DONE]")  # the request in flight finished
    assert g.proc.wait(30) == 0


# -- memory: a bound per request, enforced before the work ---------------------------------------------------------


BOUNDED = {"max_request_bytes": 1 << 20, "max_preparing": 2, "max_queue": 4, "max_concurrency": 2, "max_messages": 256}
CONTEXT = 2048  # the tiny pair's


@pytest.fixture(scope="module")
def bounded(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    flags = [arg for name, value in BOUNDED.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    s = start_server(root / "serve.log", *model_args(*tiny_pair), *flags)
    yield s
    assert s.stop() == 0, s.log_tail()


def process_memory(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def text_bound(server) -> int:
    """T as the server computed it (its start-up log line)."""
    line = next(line for line in server.log().splitlines() if "prompt text <=" in line)
    return int(line.split("prompt text <= ")[1].split()[0])


def maximal_requests(text_bytes: int) -> list[tuple[str, str, bytes]]:
    """(name, route, body): each as large as the limits let through to parsing (1 MiB, the JSON value bound), in
    the shapes that cost the most memory per byte, and the largest prompts that get tokenized."""
    from service.config import TandemSettings
    from service.memory import max_json_values

    values = max_json_values(TandemSettings.load(**BOUNDED), CONTEXT) - 8
    B = BOUNDED["max_request_bytes"]
    return [
        ("messages", "/v1/chat/completions",
         b'{"model":"tandem","messages":[' + b'{"role":"user"},' * (values // 2) + b'{"role":"user"}]}'),
        ("parts", "/v1/chat/completions", b'{"model":"tandem","messages":[{"role":"user","content":['
         + b'{"type":"text","text":"a"},' * (values // 3) + b'{"type":"text","text":"a"}]}]}'),
        ("id-lists", "/v1/completions", b'{"model":"tandem","prompt":[' + b"[1]," * (values // 2) + b"[1]]}"),
        ("unknown-fields", "/v1/completions",
         b'{"model":"tandem","prompt":"x","metadata":[' + b'{"a":{}},' * (values // 2) + b"{}]}"),
        ("text-1MiB", "/v1/completions", b'{"model":"tandem","prompt":"' + b"ab " * ((B - 64) // 3) + b'"}'),
        ("prompt-at-T", "/v1/completions", json.dumps({"model": "tandem", "prompt": ("x = 1\n" * text_bytes)[:text_bytes]}).encode()),
        ("chat-at-T", "/v1/chat/completions", json.dumps({"model": "tandem", "messages": [
            {"role": "user", "content": ("def f(): pass\n" * text_bytes)[: text_bytes // 200]}] * 199}).encode()),
        ("valid-longest", "/v1/completions",
         json.dumps({"model": "tandem", "prompt": [7] * (CONTEXT - 8), "max_tokens": 8, "ignore_eos": True}).encode()),
    ]


def test_concurrent_maximal_requests_stay_under_the_stated_memory_bound(bounded):
    from service.config import TandemSettings
    from service.memory import worst_case

    requests = maximal_requests(text_bound(bounded))
    assert all(len(body) <= BOUNDED["max_request_bytes"] for _, _, body in requests)
    pid = bounded.proc.pid

    def reset_peak() -> None:
        with open(f"/proc/{pid}/clear_refs", "w") as f:  # VmHWM := VmRSS: the peak from here on
            f.write("5")

    ready = process_memory(pid, "VmRSS")  # ready and idle: no request has been parsed yet
    # G, a slot's generation state, depends on the model: measured, as the formula says, with one longest request.
    reset_peak()
    _, route, body = requests[-1]
    assert httpx.post(bounded.base_url + route, content=body, timeout=120).status_code == 200
    generation = process_memory(pid, "VmHWM") - ready
    reset_peak()

    n = 4 * len(requests)  # 32 at once: four times what may hold a parsed body (P + Q + S = 8)
    statuses: list[int] = []
    health: list[float] = []
    done = threading.Event()

    def send(i: int) -> None:
        _, route, body = requests[i % len(requests)]
        with httpx.Client(base_url=bounded.base_url, timeout=120) as c:
            statuses.append(c.post(route, content=body, headers={"content-type": "application/json"}).status_code)

    def probe() -> None:
        with httpx.Client(base_url=bounded.base_url, timeout=30) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get("/health").status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    senders = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    elapsed = time.monotonic() - t0
    done.set()
    prober.join(30)

    peak = process_memory(pid, "VmHWM") - ready
    bound = worst_case(TandemSettings.load(**BOUNDED), max_context=CONTEXT, max_text_bytes=text_bound(bounded),
                       generation_bytes=generation, connections=n + 2)  # fmt: skip
    print(f"\nG measured {generation / 2**20:.1f} MiB; {n} maximal requests in {elapsed:.1f}s: peak RSS +{peak / 2**20:.1f} MiB above ready "
          f"({ready / 2**20:.0f} MiB); bound {bound.total / 2**20:.1f} MiB {bound}; statuses "
          f"{sorted(set(statuses))}; /health p50 {sorted(health)[len(health) // 2] * 1000:.0f} ms, "
          f"max {max(health) * 1000:.0f} ms over {len(health)}")  # fmt: skip
    assert len(statuses) == n and all(s in (200, 400, 429) for s in statuses), statuses  # every one answered, no 5xx
    assert 400 in statuses  # refused before the work (and, with P + Q already waiting, 429: timing-dependent)
    assert peak <= bound.total, f"peak +{peak} B above ready exceeds the bound {bound.total} B ({bound})"
    assert bounded.alive and health_latency(bounded) < 1.0
    assert httpx.post(bounded.base_url + route, content=body, timeout=120).status_code == 200  # and still serves
    assert sorted(health)[len(health) // 2] < 0.25  # the event loop stayed free: parsing is bounded, the rest threaded


def test_each_limit_refuses_before_the_work(bounded):
    T = text_bound(bounded)

    def post(route: str, body: bytes, **kw) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = httpx.post(bounded.base_url + route, content=body, headers={"content-type": "application/json"}, timeout=60, **kw)
        return (r.status_code, r.json()["error"]), time.perf_counter() - t0

    # As probed: a 30 MiB prompt (then 191 s and 8.2 GiB) and a chat of 300k messages (then /health 5.6 s).
    (status, err), took = post("/v1/completions", b'{"model":"tandem","prompt":"' + b"a" * (30 << 20) + b'"}')
    assert status == 413 and err["code"] == "request_too_large" and took < 5
    messages = json.dumps({"model": "tandem", "messages": [{"role": "user", "content": "hi"}] * 300_000}).encode()
    assert post("/v1/chat/completions", messages)[0][0] == 413
    # A prompt one byte past what the context can hold: refused untokenized.
    (status, err), took = post("/v1/completions", json.dumps({"model": "tandem", "prompt": "a" * (T + 1)}).encode())
    assert (status, err["code"], err["param"]) == (400, "context_length_exceeded", "prompt") and took < 2, err
    assert f"at most {T} bytes" in err["message"]
    chat = {"model": "tandem", "messages": [{"role": "user", "content": "é" * (T // 2 + 1)}]}
    (status, err), _ = post("/v1/chat/completions", json.dumps(chat, ensure_ascii=False).encode())
    assert (status, err["code"], err["param"]) == (400, "context_length_exceeded", "messages"), err
    # Message count, JSON values, unknown fields.
    chat = {"model": "tandem", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 300}]}
    (status, err), _ = post("/v1/chat/completions", json.dumps(chat).encode())
    assert (status, err["param"]) == (400, "messages") and "at most 256" in err["message"], err
    (status, err), _ = post("/v1/completions", b'{"model":"tandem","prompt":[' + b"1," * 20000 + b"1]}")
    assert status == 400 and "JSON values" in err["message"], err
    (status, err), _ = post("/v1/completions", json.dumps({"model": "tandem", "prompt": "x", "x_not_a_field": "m" * 70000}).encode())
    assert status == 400 and "unknown fields" in err["message"], err


def test_a_body_that_does_not_arrive_is_408(guarded):
    sock = raw_connection(guarded, b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.monotonic()
    assert_error_response(read_all(sock), 408, "body_timeout")
    assert 1.5 < time.monotonic() - t0 < 6
