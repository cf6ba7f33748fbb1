"""service/vllm/sessions.py: the route's per-session contexts."""

from __future__ import annotations

import time

import pytest

from service.vllm.sessions import ContextStore, StoreFullError, StoreLimits, UnknownSessionError


def test_resolve_keeps_base_then_appends_and_is_idempotent():
    store = ContextStore()
    assert store.resolve("a", 0, [1, 2, 3]).tolist() == [1, 2, 3]
    assert store.resolve("a", 3, [4]).tolist() == [1, 2, 3, 4]
    assert store.resolve("a", 3, [4]).tolist() == [1, 2, 3, 4]  # a retried round: the same context
    assert store.resolve("a", 2, [9]).tolist() == [1, 2, 9]  # rolled back to 2 committed tokens
    assert store.resolve("a", 0, [7]).tolist() == [7]  # base 0 restarts the session
    with pytest.raises(UnknownSessionError):
        store.resolve("a", 2, [])  # holds only 1 token
    with pytest.raises(UnknownSessionError):
        store.resolve("never-seen", 1, [5])
    assert store.drop("a") and not store.drop("a") and len(store) == 0


def test_a_full_store_refuses_new_sessions_and_idle_ones_expire():
    store = ContextStore(StoreLimits(max_sessions=2, ttl_s=0.3))
    store.resolve("a", 0, [1])
    store.resolve("b", 0, [2])
    with pytest.raises(StoreFullError, match="2 live sessions, at the limit --tandem-max-sessions=2"):
        store.resolve("c", 0, [4])  # refused (a 503 at the route), not a live session evicted
    assert store.resolve("a", 1, [3]).tolist() == [1, 3]  # the live ones go on
    assert store.resolve("b", 0, [5]).tolist() == [5]  # a resend of a known session is not a new one
    store.drop("b")
    store.resolve("c", 0, [4])  # a slot freed
    time.sleep(0.4)
    store.resolve("d", 0, [5])  # a and c expired meanwhile
    assert len(store) == 1
    with pytest.raises(UnknownSessionError):
        store.resolve("a", 2, [])


def test_limits_reject_values_that_would_drop_every_session():
    assert (StoreLimits().max_sessions, StoreLimits().ttl_s) == (4096, 900.0)
    with pytest.raises(ValueError, match="max_sessions"):
        StoreLimits(max_sessions=0)
    with pytest.raises(ValueError, match="ttl_s"):
        StoreLimits(ttl_s=0)
