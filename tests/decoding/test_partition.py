"""In-process checks of the partition and the wire format (no worker)."""

from __future__ import annotations

import pytest
import torch

from decoding import protocol as wire
from decoding.causal_lm import crop_cache
from decoding.partition import BodyModel, EdgeModel, SplitConfigError, check_split, parse_layers

L = 3  # the tiny verifier's depth
IDS = list(range(7, 47))


def full_forward(edge: EdgeModel, body: BodyModel, token_ids: torch.Tensor) -> torch.Tensor:
    """Cache-less split forward over one sequence [T] -> logits [T, V] float32."""
    h = body(edge.run_head(token_ids, None, 0), None, 0)
    return edge.run_tail(h, None, 0, keep=h.shape[1])


@pytest.fixture(scope="module")
def reference_logits(tiny_verifier_lm):
    with torch.inference_mode():
        return tiny_verifier_lm.model(input_ids=torch.tensor([IDS])).logits[0].float()


@pytest.mark.parametrize("a,b", [(1, 2), (1, 3), (2, 3)])
def test_each_side_reads_only_its_tensors(tiny_verifier_dir, a, b):
    body = BodyModel(tiny_verifier_dir, a, b)
    edge = EdgeModel(tiny_verifier_dir, a, b)
    all_keys = set(body.reader.keys())
    body_keys = {k for k in all_keys if any(k.startswith(f"model.layers.{i}.") for i in range(a, b))}
    assert set(body.loaded_keys) == body_keys
    assert set(edge.loaded_keys) == all_keys - body_keys
    # The modules hold exactly what was read: no embeddings or head on the worker side.
    assert sum(p.numel() for p in body.parameters()) == sum(
        body.reader.read([k], torch.float32)[k].numel() for k in body_keys
    )
    assert not any("embed" in n or "lm_head" in n for n, _ in body.named_parameters())


@pytest.mark.parametrize("a,b", [(1, 2), (1, 3), (2, 3)])
def test_split_forward_matches_unsplit(tiny_verifier_dir, reference_logits, a, b):
    edge, body = EdgeModel(tiny_verifier_dir, a, b), BodyModel(tiny_verifier_dir, a, b)
    torch.testing.assert_close(full_forward(edge, body, torch.tensor(IDS)), reference_logits, atol=1e-5, rtol=0)
    # Incremental, with caches, chunked steps (multi-token steps need the causal mask
    # within the new tokens) and a rollback.
    hc, bc, tc = edge.head.new_cache(), body.new_cache(), edge.tail.new_cache()
    pos, rows = 0, []
    for chunk in (IDS[:9], IDS[9:10], IDS[10:16], IDS[16:]):
        h = body(edge.run_head(chunk, hc, pos), bc, pos)
        rows.append(edge.run_tail(h, tc, pos, keep=len(chunk)))
        pos += len(chunk)
    torch.testing.assert_close(torch.cat(rows), reference_logits, atol=1e-5, rtol=0)
    for c in (hc, bc, tc):
        crop_cache(c, 12)
    h = body(edge.run_head(IDS[12:], hc, 12), bc, 12)
    torch.testing.assert_close(edge.run_tail(h, tc, 12, keep=len(IDS) - 12), reference_logits[12:], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "a,b,match",
    [(0, 2, "a=0 must be >= 1"), (1, 4, "b=4 exceeds"), (2, 2, "a < b"), (3, 2, "a < b"), (-1, 2, ">= 1")],
)
def test_bad_split_points(tiny_verifier_dir, a, b, match):
    with pytest.raises(SplitConfigError, match=match):
        check_split(a, b, L)
    with pytest.raises(SplitConfigError, match=match):
        BodyModel(tiny_verifier_dir, a, b)


@pytest.mark.parametrize("spec", ["1", "1:2:3", "a:b", ""])
def test_bad_layer_spec(spec):
    with pytest.raises(SplitConfigError, match="a:b"):
        parse_layers(spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wire_roundtrip(dtype):
    t = torch.randn(5, 64).to(dtype)
    frame = wire.encode({"session": "s", "start": 3}, t)
    assert len(frame) < t.numel() * t.element_size() + 200  # raw bytes plus a small header
    header, back = wire.decode(frame)
    assert header["start"] == 3 and header["shape"] == [5, 64]
    assert back.dtype == dtype and torch.equal(back, t)


def test_wire_rejects_malformed_frames():
    good = wire.encode({"session": "s"}, torch.zeros(2, 4, dtype=torch.float16))
    cases = {
        "magic": b"XXXX" + good[4:],
        "truncated": good[:12],
        "payload is": good[:-2],
        "not valid JSON": good[:10] + b"}" * (len(good) - 10),
        "nests deeper": good[:10] + b"{" * (len(good) - 10),
    }
    for match, frame in cases.items():
        with pytest.raises(wire.WireError, match=match):
            wire.decode(frame)
    bad_dtype = wire._PREFIX.pack(wire.MAGIC, wire.VERSION, 31) + b'{"dtype":"int64","shape":[1, 1]}'[:31]
    with pytest.raises(wire.WireError):
        wire.decode(bad_dtype)


def test_uplink_noise_is_a_function_of_the_prefix(tiny_verifier_dir):
    """Re-sending a position (replay, rollback, the same prompt again) shows the same noisy vector,
    never a fresh draw an observer could average away; another prefix gets independent noise."""
    from decoding.backends.split_edge import SplitVerifier

    edge = EdgeModel(tiny_verifier_dir, 1, 2)
    v = SplitVerifier(edge, "http://127.0.0.1:9", noise_scale=0.5, noise_seed=3)
    h = edge.run_head(IDS, None, 0)[0]
    d1 = v.prefix_digests(b"", IDS)
    d2 = v.prefix_digests(d1[9], IDS[10:])  # the same context, continued from position 10
    assert d2 == d1[10:]
    n1, n2 = v.perturb(h, d1), v.perturb(h, d1)
    assert torch.equal(n1, n2)
    ratio = ((n1 - h).norm(dim=-1) / h.norm(dim=-1)).mean().item()
    assert 0.4 < ratio < 0.6
    other = v.prefix_digests(b"", [IDS[0] + 1] + IDS[1:])  # one different token changes every later digest
    assert not any(a == b for a, b in zip(d1, other))
    w = SplitVerifier(edge, "http://127.0.0.1:9", noise_scale=0.5)  # a random key: different noise
    assert not torch.equal(w.perturb(h, w.prefix_digests(b"", IDS)), n1)


def test_route_policy():
    from service.plan import route
    from service.config import TandemSettings

    by_request = TandemSettings.load()
    assert route(by_request, "split") == (True, "speculative")
    assert route(by_request, "split", has_drafter=False) == (True, "verifier-only")
    assert route(by_request, "speculative") == (False, "speculative")
    assert route(by_request, None) == (False, by_request.mode)
    always = TandemSettings.load(split_policy="always", split_speculative=False)
    assert route(always, None) == (True, "verifier-only")
    assert route(always, "speculative") == (True, "speculative")
    assert route(always, "drafter-only") == (False, "drafter-only")


DEMO = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "demo" / "verifier"


def test_demo_split_points_match_unsplit():
    from decoding.causal_lm import CausalLM

    lm = CausalLM(DEMO)
    L = lm.model.config.num_hidden_layers
    ids = torch.tensor(IDS)
    with torch.inference_mode():
        ref = lm.model(input_ids=ids[None]).logits[0].float()
    for a, b in [(1, L - 1), (1, L), (L // 2, L - 1), (L - 1, L)]:
        got = full_forward(EdgeModel(DEMO, a, b), BodyModel(DEMO, a, b), ids)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    lm.close()


def test_layer_spec_forms(tiny_verifier_dir):
    from decoding.partition import resolve_layers

    assert parse_layers("1:") == (1, None) and resolve_layers(1, None, L) == (1, L)
    assert parse_layers("1:-1") == (1, -1) and resolve_layers(1, -1, L) == (1, L - 1)
    assert EdgeModel(tiny_verifier_dir, *parse_layers("2:")).b == L
    with pytest.raises(SplitConfigError, match="a < b"):
        resolve_layers(2, -1, L)
