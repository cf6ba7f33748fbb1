"""Split inference end to end: real ``tandem split-worker`` subprocesses over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import torch

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import Generation, SpecOptions, SpeculativeRouter
from decoding import protocol as wire
from decoding.backends.split_edge import SplitVerifier
from decoding.partition import EdgeModel, model_fingerprint
from decoding.verifiers import HFVerifier, VerifierUnavailableError
from service.metrics import Metrics
from service.split_worker.metrics import WorkerMetrics
from service.split_worker.sessions import KVSessionStore, StepError, session_overhead_bytes
from tests.support.split import DEMO_VERIFIER, SPLITS, TOKEN, WorkerProcess

PROMPTS = ["def main():", "import os\nimport sys\n", "class Foo(Bar):\n    def __init__(self", "x = [i * i for i in range("]
PLAIN = SpecOptions(mode="verifier-only")
SPEC = SpecOptions(mode="speculative", num_draft_tokens=4)
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
# Logit tolerances against the unsplit model. float32 on the wire: only summation order differs.
# float16 on the wire rounds the layer-a and layer-b states to 11 significant bits.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2}


#: The gateway's metrics, fed with the rounds these tests run (as the gateway feeds its own).
METRICS = Metrics()


def metric(name: str, **labels) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


async def observed(router: SpeculativeRouter, prompt_ids, params, options) -> Generation:
    """``router.generate``, with every round's event recorded in METRICS."""
    tokens: list[int] = []
    async for chunk in router.stream(prompt_ids, params, options):
        METRICS.observe_round(chunk.event)
        tokens += chunk.token_ids
    return Generation(list(prompt_ids), tokens, "", chunk.finish_reason, chunk.stats)


@pytest.fixture(scope="module")
def edges(tiny_verifier_dir):
    out = {}
    for s in SPLITS:
        a, b = map(int, s.split(":"))
        out[s] = EdgeModel(tiny_verifier_dir, a, b)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_verifier_dir):
    return load_tokenizer(tiny_verifier_dir)


@pytest.fixture(scope="module")
def reference(tiny_verifier_lm, tokenizer):
    """Unsplit greedy tokens per prompt (the verifier alone)."""
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), None, tokenizer)
    return {p: asyncio.run(router.generate(tokenizer.encode(p), GREEDY, PLAIN)).token_ids for p in PROMPTS}


def split_verifier(edge, worker, **kw) -> SplitVerifier:
    kw.setdefault("token", worker.token)
    return SplitVerifier(edge, worker.url, **kw)


async def split_generate(edge, worker, tokenizer, prompts, options, drafter=None, measured_cost=False, **kw):
    verifier = split_verifier(edge, worker, **kw)
    try:
        router = SpeculativeRouter(verifier, drafter, tokenizer, measure_cost=measured_cost)
        gens = [await observed(router, tokenizer.encode(p), GREEDY, options) for p in prompts]
        assert verifier.open_sessions == 0  # tandem_split_sessions_active: every session closed
        return gens
    finally:
        await verifier.aclose()


@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("split", SPLITS)
def test_split_logits_match_unsplit(split, wire_dtype, edges, tiny_workers, tiny_verifier_lm):
    """Score drafts round by round (with rollbacks) and compare every logits row."""
    ids = list(range(20, 45))
    rounds = [([101, 7, 9], [101, 7]), ([5, 6, 8, 13], []), ([], []), ([44, 2], [44, 2])]  # (draft, accepted)

    async def run():
        ref = await HFVerifier(tiny_verifier_lm).start(ids)
        verifier = split_verifier(edges[split], tiny_workers[split], wire_dtype=wire_dtype)
        sess = await verifier.start(ids)
        try:
            for draft, accepted in rounds:
                expected, got = await ref.score(draft), await sess.score(draft)
                assert got.shape == expected.shape == (len(draft) + 1, verifier.vocab_size)
                torch.testing.assert_close(got, expected, atol=TOLERANCE[wire_dtype], rtol=0)
                assert torch.equal(got.argmax(-1), expected.argmax(-1))
                bonus = int(expected[len(accepted)].argmax())
                ref.extend(accepted + [bonus])
                sess.extend(accepted + [bonus])
            assert sess.rounds == len(rounds) and sess.replays == 0
        finally:
            await sess.close()
            await verifier.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("split", SPLITS)
def test_split_plain_is_token_identical_to_unsplit(split, edges, tiny_workers, tokenizer, reference):
    gens = asyncio.run(split_generate(edges[split], tiny_workers[split], tokenizer, PROMPTS, PLAIN))
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == reference[prompt]
        assert gen.stats.rounds == len(gen.token_ids)  # plain split decoding: one round trip per token


@pytest.mark.parametrize("drafter_name", ["bad", "perfect"])
def test_split_speculative_is_token_identical_to_split_plain(
    drafter_name, edges, tiny_workers, tokenizer, reference, tiny_drafter_lm, tiny_verifier_lm
):
    # "bad": an unrelated random drafter (rejections and rollbacks every round);
    # "perfect": the verifier drafting for itself (everything accepted, k+1 tokens per round trip).
    lm = tiny_drafter_lm if drafter_name == "bad" else tiny_verifier_lm
    drafter = HFDrafter(lm, cost_ratio=0.05)
    split, prompts = "1:2", PROMPTS[:2]
    plain = asyncio.run(split_generate(edges[split], tiny_workers[split], tokenizer, prompts, PLAIN))
    spec = asyncio.run(split_generate(edges[split], tiny_workers[split], tokenizer, prompts, SPEC, drafter,
                                      measured_cost=drafter_name == "perfect"))
    for p, s, prompt in zip(plain, spec, prompts):
        assert s.token_ids == p.token_ids == reference[prompt]
    rounds = sum(s.stats.rounds for s in spec)
    tokens = sum(len(s.token_ids) for s in spec)
    if drafter_name == "perfect":
        assert tokens / rounds > 3  # several tokens per network round trip
    else:
        assert sum(s.stats.draft_tokens - s.stats.accepted_tokens for s in spec) > 0  # rollbacks happened


def test_session_store_refusals_and_evictions():
    """KVSessionStore alone: which steps it continues, and why it refuses the others."""
    from prometheus_client import CollectorRegistry
    from transformers import DynamicCache

    registry = CollectorRegistry()
    store = KVSessionStore(ttl_s=10, max_kv_bytes=100, kv_bytes_per_token=10, overhead_bytes=0, new_cache=DynamicCache,
                           metrics=WorkerMetrics(registry))  # fmt: skip

    def refused(sid, start, n) -> StepError:
        with pytest.raises(StepError) as info:
            store.open(sid, start, n)
        return info.value

    err = refused("a", 3, 1)
    assert (err.status, err.code) == (409, "unknown_session")
    session = store.open("a", 0, 4)  # a new session starts at 0
    assert store.open("a", 0, 4) is session and list(store.sessions) == ["a"]
    assert refused("a", 1, 1).code == "cache_mismatch"  # the body cache holds 0 positions, not 1
    assert refused("b", 0, 11).code == "kv_memory_exceeded" and "b" not in store.sessions
    store.expire(now=session.last_used + 11)
    err = refused("a", 1, 1)
    assert err.code == "session_evicted" and "TTL (10 s)" in err.message
    assert registry.get_sample_value("tandem_split_worker_evictions_total", {"reason": "ttl"}) == 1
    store.open("a", 0, 1)  # a replay from 0 starts it again
    assert "a" not in store.tombstones and store.close("a") and not store.close("a")


def test_worker_holds_only_its_layers(tiny_workers):
    for split, worker in tiny_workers.items():
        a, b = map(int, split.split(":"))
        info = httpx.get(f"{worker.url}/v1/split/info", headers=worker.headers()).json()
        assert info["layers"] == [a, b]
        layer_of = {int(k.split(".")[2]) for k in info["parameters"]}
        assert layer_of == set(range(a, b))
        assert all(k.startswith("model.layers.") for k in info["loaded_tensors"] + info["parameters"])
        assert set(info["loaded_tensors"]) == set(info["parameters"])  # read exactly what it runs
        assert {int(k.split(".")[2]) for k in info["loaded_tensors"]} == set(range(a, b))


def step_frame(worker, edge, *, session="t1", start=0, tensor=None, **header) -> bytes:
    if tensor is None:
        tensor = torch.zeros(3, edge.hidden_size, dtype=torch.float16)
    base = {"session": session, "start": start, "layers": [edge.a, edge.b], "fingerprint": edge.fingerprint}
    return wire.encode({**base, **header}, tensor)


def raw_frame(meta: bytes, payload_bytes: int) -> bytes:
    return wire._PREFIX.pack(wire.MAGIC, wire.VERSION, len(meta)) + meta + b"\0" * payload_bytes


def post(worker, content: bytes, headers=None):
    headers = {**worker.headers(), "content-type": wire.CONTENT_TYPE, **(headers or {})}
    return httpx.post(f"{worker.url}/v1/split/step", content=content, headers=headers, timeout=10)


def test_bad_inputs_get_clear_errors_and_the_worker_stays_up(edges, tiny_workers, tiny_verifier_dir):
    worker, edge = tiny_workers["1:2"], edges["1:2"]
    H = edge.hidden_size
    cases = [
        (step_frame(worker, edge, tensor=torch.zeros(3, H + 1, dtype=torch.float16)), 400, "bad_tensor", f"[n >= 1, {H}]"),
        (step_frame(worker, edge, tensor=torch.zeros(2, 3, H, dtype=torch.float16)), 400, "bad_tensor", "shape"),
        (step_frame(worker, edge, tensor=torch.zeros(0, H, dtype=torch.float16)), 400, "bad_tensor", "n >= 1"),
        (step_frame(worker, edge, tensor=torch.full((2, H), float("nan"))), 400, "bad_tensor", "NaN"),
        (raw_frame(b'{"session":"t1","start":0,"dtype":"int64","shape":[1,%d]}' % H, 8 * H), 400, "bad_frame", "dtype"),
        (b"this is not a frame", 400, "bad_frame", "magic"),
        (step_frame(worker, edge, session="never-seen", start=5), 409, "unknown_session", "replay"),
        (step_frame(worker, edge, session="bad id!"), 400, "bad_header", "session"),
        (step_frame(worker, edge, start=-1), 400, "bad_header", "start"),
        (step_frame(worker, edge, layers=[1, 3]), 400, "model_mismatch", "layers 1:2"),
        (step_frame(worker, edge, fingerprint="0" * 16), 400, "model_mismatch", "fingerprint"),
        (step_frame(worker, edge, start=edge.max_context - 1), 400, "context_too_long", "exceed"),
    ]
    for content, status, code, text in cases:
        resp = post(worker, content)
        assert resp.status_code == status, (code, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code and text in err["message"], err
    # float32, float16 and bfloat16 frames are all accepted (the dtype is per frame).
    for dtype in (torch.float32, torch.bfloat16):
        assert post(worker, step_frame(worker, edge, tensor=torch.zeros(2, H, dtype=dtype))).status_code == 200
    # Oversized bodies (the shared workers accept 1 MiB): refused from the declared length.
    big = step_frame(worker, edge, tensor=torch.zeros(5000, H, dtype=torch.float32))
    resp = post(worker, big)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    # Auth: wrong or missing token.
    for headers in ({"authorization": "Bearer wrong"}, {"authorization": ""}):
        resp = post(worker, step_frame(worker, edge), headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{worker.url}/health").json()["status"] == "ok"
    assert worker.alive
    metrics = httpx.get(f"{worker.url}/metrics").text
    assert 'tandem_split_worker_errors_total{code="bad_tensor"}' in metrics


HEADER_CASES = [
    ({"layers": 5}, "layers"), ({"layers": True}, "layers"), ({"layers": 1.5}, "layers"), ({"layers": "1:2"}, "layers"),
    ({"layers": [1, True]}, "layers"), ({"layers": [1, 2, 3]}, "layers"), ({"start": True}, "start"),
    ({"start": 1.5}, "start"), ({"start": "0"}, "start"), ({"return_from": False}, "return_from"),
    ({"fingerprint": 5}, "fingerprint"), ({"fingerprint": ["x"]}, "fingerprint"), ({"session": 7}, "session"),
    ({"session": {"a": 1}}, "session"), ({"surprise": 1}, "surprise"),
]


def assert_envelope(resp: httpx.Response, status: int, code: str, text: str) -> None:
    assert resp.status_code == status and resp.headers["content-type"] == "application/json", (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert err["code"] == code and text in err["message"] and set(err) == {"message", "type", "param", "code"}, err


def test_every_header_field_is_validated_and_every_error_is_the_json_envelope(edges, tiny_workers):
    worker, edge = tiny_workers["1:2"], edges["1:2"]
    for header, field in HEADER_CASES:
        assert_envelope(post(worker, step_frame(worker, edge, **header)), 400, "bad_header", f"header '{field}")
    # A 4,000-byte header nested 2,000 deep: refused before it is parsed, not a RecursionError.
    deep = b'{"session":"t1","start":0,"x":' + b"[" * 1995 + b"]" * 1995 + b"}"
    assert 4000 <= len(deep) <= wire.MAX_HEADER_BYTES
    assert_envelope(post(worker, raw_frame(deep, 0)), 400, "bad_frame", "nests deeper")
    deep_objects = b'{"session":"t1","start":0,"x":' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}"
    assert_envelope(post(worker, raw_frame(deep_objects, 0)), 400, "bad_frame", "nests deeper")
    # Brackets inside strings are not nesting.
    frame = step_frame(worker, edge, session="t-deep", fingerprint="[[[[[[[[{{{{")
    assert_envelope(post(worker, frame), 400, "model_mismatch", "fingerprint")
    # Routes and methods the worker does not have.
    assert_envelope(httpx.get(f"{worker.url}/v1/split/nope", headers=worker.headers()), 404, "not_found", "/v1/split/nope")
    assert_envelope(httpx.get(f"{worker.url}/v1/split/step", headers=worker.headers()), 405, "method_not_allowed", "GET")
    # HTTP that h11 refuses (here a non-numeric Content-Length) never reaches the app: the envelope all the same.
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/split/step HTTP/1.1\r\nHost: w\r\nContent-Length: abc\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"]["code"] == "invalid_http_request"
    assert httpx.get(f"{worker.url}/health").json()["status"] == "ok" and worker.alive


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_the_kv_bound_counts_resident_bytes():
    """One-row sessions are the worst case (overhead against KV bytes). The counted size of the sessions must
    cover the resident memory they add, and past the bound, resident growth stays within it. (The demo
    verifier's last two layers: its steps are the fastest of the models at hand.)"""
    bound = 3 << 20
    worker = WorkerProcess(DEMO_VERIFIER, "10:", extra=["--max-kv-bytes", str(bound)]).start()
    client = httpx.Client(base_url=worker.url, headers={**worker.headers(), "content-type": wire.CONTENT_TYPE}, timeout=30)
    info = client.get("/v1/split/info").json()
    row = torch.randn(1, info["hidden_size"])

    def open_sessions(prefix: str, count: int) -> None:
        for i in range(count):
            header = {"session": f"{prefix}{i}", "start": 0, "layers": info["layers"], "fingerprint": info["fingerprint"]}
            assert client.post("/v1/split/step", content=wire.encode(header, row)).status_code == 200

    def counted() -> int:
        return client.get("/health").json()["kv_cache_bytes"]

    try:
        # The server's own first-use growth; few sessions, so that the measured ones need new memory.
        open_sessions("warm", 50)
        for i in range(50):
            client.delete(f"/v1/split/sessions/warm{i}")
        assert counted() == 0
        rss0 = rss_bytes(worker.proc.pid)
        open_sessions("a", 400)
        held = counted()
        assert held <= bound  # no eviction yet
        grown = rss_bytes(worker.proc.pid) - rss0
        assert grown <= held, f"400 one-row sessions grew RSS by {grown} B but are counted as {held} B"
        # Past the bound: least recently used sessions are evicted (each leaves a tombstone of a few hundred bytes).
        open_sessions("b", 800)
        assert counted() <= bound
        grown = rss_bytes(worker.proc.pid) - rss0
        assert grown <= bound + 800 * 512, f"RSS grew by {grown} B with a {bound}-byte KV bound"
    finally:
        client.close()
        worker.stop()


def test_edge_refuses_a_worker_serving_another_slice(edges, tiny_workers):
    async def run():
        verifier = split_verifier(edges["1:2"], tiny_workers["1:3"])
        try:
            with pytest.raises(VerifierUnavailableError, match="layers"):
                await verifier.check_ready()
            sess = await verifier.start([1, 2, 3])
            with pytest.raises(VerifierUnavailableError, match="model_mismatch"):
                await sess.score([])
            await sess.close()
        finally:
            await verifier.aclose()

    asyncio.run(run())


def test_kill_and_restart_mid_generation(tiny_workers, edges, tokenizer, reference):
    worker = tiny_workers["1:3"]  # shared: it comes back on the same port with the same slice
    prompt = PROMPTS[1]
    replays_before = metric("tandem_split_replays_total", reason="unknown_session")

    async def run() -> list[int]:
        verifier = split_verifier(edges["1:3"], worker, reconnect_s=120)
        router = SpeculativeRouter(verifier, None, tokenizer)
        tokens: list[int] = []
        try:
            async for chunk in router.stream(tokenizer.encode(prompt), GREEDY, PLAIN):
                METRICS.observe_round(chunk.event)
                tokens += chunk.token_ids
                if len(tokens) == 8:
                    worker.kill()  # mid-generation: the worker loses every session
                    worker.spawn()  # and comes back on the same port seconds later
        finally:
            await verifier.aclose()
        return tokens

    try:
        assert asyncio.run(run()) == reference[prompt]
        assert metric("tandem_split_replays_total", reason="unknown_session") == replays_before + 1
    finally:
        worker.wait_ready()


def test_worker_unreachable_is_a_503_class_error(edges, tiny_verifier_dir):
    worker = WorkerProcess(tiny_verifier_dir, "1:2")  # never started: nothing listens on its port

    async def run():
        verifier = split_verifier(edges["1:2"], worker, reconnect_s=0.5)
        try:
            with pytest.raises(VerifierUnavailableError, match="not reachable"):
                await verifier.check_ready()
            sess = await verifier.start([5, 6, 7])
            t0 = time.monotonic()
            with pytest.raises(VerifierUnavailableError, match="unreachable"):
                await sess.score([1, 2])
            assert time.monotonic() - t0 < 5
            await sess.close()
        finally:
            await verifier.aclose()

    asyncio.run(run())


def test_ttl_and_memory_eviction_are_replayed(tiny_verifier_dir, edges, tokenizer, reference):
    edge = edges["1:2"]
    cfg = edge.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # one fp32 layer
    a, b = tokenizer.encode(PROMPTS[2]), tokenizer.encode(PROMPTS[3])
    # Room for either of two sessions, not both: each evicts the other as it grows.
    room = max(len(a), len(b)) + GREEDY.max_tokens + 2
    bound = per_token * room + session_overhead_bytes(1)
    worker = WorkerProcess(tiny_verifier_dir, "1:2", extra=["--session-ttl", "0.6", "--max-kv-bytes", str(bound)])
    worker.start()

    async def run():
        verifier = split_verifier(edge, worker)
        try:
            router = SpeculativeRouter(verifier, None, tokenizer)
            # TTL: pause between rounds longer than the TTL.
            tokens, paused = [], False
            async for chunk in router.stream(tokenizer.encode(PROMPTS[0]), GREEDY, PLAIN):
                METRICS.observe_round(chunk.event)
                tokens += chunk.token_ids
                if len(tokens) == 5 and not paused:
                    paused = True
                    await asyncio.sleep(1.5)
            assert tokens == reference[PROMPTS[0]]
            # Memory bound: two interleaved sessions that do not fit together.
            gens = await asyncio.gather(observed(router, a, GREEDY, PLAIN), observed(router, b, GREEDY, PLAIN))
            assert [g.token_ids for g in gens] == [reference[PROMPTS[2]], reference[PROMPTS[3]]]
            # One session that alone exceeds the bound: a clear refusal.
            sess = await verifier.start(list(range(1, room + 10)))
            with pytest.raises(VerifierUnavailableError, match="kv_memory_exceeded"):
                await sess.score([])
            await sess.close()
        finally:
            await verifier.aclose()

    ttl_before = metric("tandem_split_replays_total", reason="session_evicted")
    try:
        asyncio.run(run())
        assert metric("tandem_split_replays_total", reason="session_evicted") >= ttl_before + 2
        text = httpx.get(f"{worker.url}/metrics").text
        assert 'tandem_split_worker_evictions_total{reason="ttl"}' in text
        assert 'tandem_split_worker_evictions_total{reason="memory"}' in text
        assert "tandem_split_worker_kv_cache_bytes" in text
    finally:
        worker.stop()


def test_edge_metrics_and_bytes_per_token(edges, tiny_workers, tokenizer):
    up0, rounds0 = metric("tandem_split_uplink_bytes_total"), metric("tandem_split_rounds_total")
    gens = asyncio.run(split_generate(edges["1:2"], tiny_workers["1:2"], tokenizer, PROMPTS[:1], PLAIN))
    rounds = metric("tandem_split_rounds_total") - rounds0
    up = metric("tandem_split_uplink_bytes_total") - up0
    assert rounds == gens[0].stats.rounds
    H = edges["1:2"].hidden_size
    # After the prompt, a plain round sends one fp16 row plus a small header.
    prompt_len = len(tokenizer.encode(PROMPTS[0]))
    assert up < 2 * H * (prompt_len + rounds) + 300 * rounds
    assert metric("tandem_split_round_seconds_count") >= rounds


def test_with_noise_speculative_still_matches_plain(edges, tiny_workers, tokenizer, reference, tiny_verifier_lm):
    """The noise of a position is a function of its prefix (keyed), so plain and speculative
    split decoding see the same noisy states: still token-identical to each other, while the
    noise makes them depart from the unsplit model."""
    split, prompts = "1:2", PROMPTS[:2]
    drafter = HFDrafter(tiny_verifier_lm, cost_ratio=0.05)
    kw = dict(noise_scale=0.5, noise_seed=7)
    plain = asyncio.run(split_generate(edges[split], tiny_workers[split], tokenizer, prompts, PLAIN, **kw))
    spec = asyncio.run(split_generate(edges[split], tiny_workers[split], tokenizer, prompts, SPEC, drafter, **kw))
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert [g.token_ids for g in plain] != [reference[p] for p in prompts]


def test_demo_pair_split_is_token_identical(demo_worker, tiny_verifier_dir):
    """Runs only when models/demo/ exists: split plain/speculative vs the unsplit demo verifier."""
    from decoding.default_models import DEMO_DIR

    tok = load_tokenizer(DEMO_VERIFIER)
    lm, dlm = CausalLM(DEMO_VERIFIER), CausalLM(DEMO_DIR / "drafter")
    a, b = demo_worker.layers.split(":")
    edge = EdgeModel(DEMO_VERIFIER, int(a), int(b))
    assert edge.fingerprint == model_fingerprint(DEMO_VERIFIER)
    prompts = PROMPTS[:2]
    ref_router = SpeculativeRouter(HFVerifier(lm), None, tok)
    ref = [asyncio.run(ref_router.generate(tok.encode(p), GREEDY, PLAIN)).token_ids for p in prompts]
    plain = asyncio.run(split_generate(edge, demo_worker, tok, prompts, PLAIN))
    spec = asyncio.run(split_generate(edge, demo_worker, tok, prompts, SPEC, HFDrafter(dlm)))
    assert [g.token_ids for g in plain] == ref
    assert [g.token_ids for g in spec] == ref


def test_split_router_measures_the_cost_ratio(edges, tiny_workers, tokenizer, tiny_drafter_lm):
    drafter = HFDrafter(tiny_drafter_lm, cost_ratio=0.5)

    async def run():
        verifier = split_verifier(edges["1:2"], tiny_workers["1:2"])
        router = SpeculativeRouter(verifier, drafter, tokenizer, measure_cost=True)
        assert router.cost.ratio == 0.5  # nothing measured yet
        await router.generate(tokenizer.encode(PROMPTS[0]), GREEDY, SPEC)
        await verifier.aclose()
        return router.cost

    cost = asyncio.run(run())
    assert cost.draft_token_s > 0 and cost.verify_s > 0
    assert cost.ratio == cost.draft_token_s / cost.verify_s != 0.5


def test_a_context_past_the_uplink_buffer_replays_exactly(tiny_workers, edges, tokenizer):
    """The edge keeps the sent uplink in a buffer that grows (64 rows first); a replay after it has
    grown re-sends every row exactly, so the tokens equal an uninterrupted run."""
    worker = tiny_workers["1:3"]
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    prompt = tokenizer.encode(PROMPTS[2])

    async def run(kill_at: int | None) -> list[int]:
        verifier = split_verifier(edges["1:3"], worker, reconnect_s=120)
        router = SpeculativeRouter(verifier, None, tokenizer)
        tokens: list[int] = []
        try:
            async for chunk in router.stream(prompt, params, PLAIN):
                METRICS.observe_round(chunk.event)
                tokens += chunk.token_ids
                if len(tokens) == kill_at:
                    worker.kill()
                    worker.spawn()
        finally:
            await verifier.aclose()
        return tokens

    try:
        uninterrupted = asyncio.run(run(None))
        assert len(prompt) + 90 > 64  # the buffer has grown by the time of the replay
        replays_before = metric("tandem_split_replays_total", reason="unknown_session")
        assert asyncio.run(run(90)) == uninterrupted
        assert metric("tandem_split_replays_total", reason="unknown_session") == replays_before + 1
    finally:
        worker.wait_ready()
