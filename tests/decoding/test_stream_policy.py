"""decoding/stream_policy.py: when one stream from the verifier beats speculative rounds (no server needed)."""

from __future__ import annotations

import pytest

from decoding.events import RoundEvent, TransportEvent
from decoding.stream_policy import StreamPolicy, expected_tokens


def round_event(k: int, round_s: float, server_s: float, draft_s: float, **transport) -> RoundEvent:
    t = TransportEvent(backend="vllm", round_s=round_s, server_s=server_s, **transport)
    return RoundEvent(k=k, accepted=0, emitted=1, verified=True, draft_s=draft_s, verify_s=round_s, transport=t)


def test_expected_tokens_per_round():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(0.9, 0) == 1.0


def test_high_rtt_prefers_the_stream_and_low_rtt_the_rounds():
    policy = StreamPolicy(smoothing=1.0)
    assert policy.prefer_stream(0.8, 4, streaming=False) is False  # nothing measured: keep what it does
    # RTT 50 ms, 20 ms of server time per round, 2 ms per draft token; a stream step of 20 ms.
    policy.observe_round(round_event(4, round_s=0.070, server_s=0.020, draft_s=0.008))
    assert policy.rtt_s == pytest.approx(0.050) and policy.server_s == pytest.approx(0.020)
    policy.observe_stream(0.2, 10)
    # Rounds: (1 - 0.8^5) / 0.2 = 3.36 tokens per 78 ms = 43 tok/s; stream: 50 tok/s.
    assert policy.prefer_stream(0.8, 4, streaming=False)
    # At RTT 0 the same rounds give 3.36 / 28 ms = 120 tok/s.
    policy.observe_round(round_event(4, round_s=0.020, server_s=0.020, draft_s=0.008))
    assert not policy.prefer_stream(0.8, 4, streaming=True)


def test_hysteresis_and_unclean_rounds():
    policy = StreamPolicy(smoothing=1.0, hysteresis=0.1)
    policy.observe_round(round_event(0, round_s=0.030, server_s=0.010, draft_s=0.0))  # 1 token / 30 ms
    policy.observe_stream(0.0315, 1)  # 31.7 tok/s vs 33.3: within 10%
    assert policy.prefer_stream(0.5, 0, streaming=True) and not policy.prefer_stream(0.5, 0, streaming=False)
    # A retried or resynced round says nothing about the network.
    before = (policy.rtt_s, policy.server_s)
    policy.observe_round(round_event(0, round_s=5.0, server_s=0.010, draft_s=0.0, retries=1))
    policy.observe_round(round_event(0, round_s=5.0, server_s=0.010, draft_s=0.0, round_trips=2))
    assert (policy.rtt_s, policy.server_s) == before
