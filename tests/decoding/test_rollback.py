"""RollbackContext on its own: random feed / commit sequences against a reference.

The "cache" here holds, for each position, the whole prefix its keys and values
were computed from, so a stale entry (a rejected draft, or a position computed
under another prefix) cannot pass for a valid one.
"""

from __future__ import annotations

import random

import pytest

from decoding.backends.split_edge import SplitVerifySession
from decoding.causal_lm import CachedSequence, RollbackContext


class PrefixCache(RollbackContext):
    """A rollback context whose cache stores, per position, the prefix that position saw."""

    def __init__(self, prompt_ids):
        super().__init__(prompt_ids)
        self.kv: list[tuple[int, ...]] = []
        self.crops: list[tuple[int, int]] = []  # (length before, length kept)

    def feed(self, tokens):
        for t in tokens:
            self.kv.append((self.kv[-1] if self.kv else ()) + (t,))
        self.fed(tokens)

    def _crop_cache(self, length: int) -> None:
        self.crops.append((len(self.kv), length))
        del self.kv[length:]


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_cache(ctx: PrefixCache) -> None:
    # The cache holds exactly ``cached``, each position computed from its own prefix ...
    assert ctx.kv == [tuple(ctx.cached[: i + 1]) for i in range(len(ctx.cached))]
    # ... and agrees with the committed context on their common length.
    n = min(len(ctx.cached), len(ctx.ids))
    assert ctx.cached[:n] == ctx.ids[:n]


@pytest.mark.parametrize("seed", range(40))
def test_random_commits_and_rollbacks_match_the_reference(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 50])  # small vocabularies: corrections often equal a cached draft
    ctx = PrefixCache([rng.randrange(vocab) for _ in range(rng.randint(1, 6))])
    for _ in range(60):
        op = rng.random()
        if op < 0.45:  # a verifier round: the tokens the cache lacks, then the k drafts, in one pass
            before = list(ctx.cached)
            pending = ctx.pending()
            assert pending, "the last committed token is always re-fed"
            assert ctx.cached + pending == ctx.ids
            assert len(ctx.cached) == min(common_prefix(before, ctx.ids), len(ctx.ids) - 1)
            ctx.feed(pending + [rng.randrange(vocab) for _ in range(rng.randint(0, 5))])
        elif op < 0.7:  # a drafter round: feed one token at a time, the last draft stays unfed
            feed = ctx.pending()
            for _ in range(rng.randint(1, 4)):
                ctx.feed(feed)
                feed = [rng.randrange(vocab)]
        else:  # commit: part of what was fed beyond the context, then a correction (or anything at all)
            drafts = ctx.cached[len(ctx.ids) :]
            accepted = drafts[: rng.randint(0, len(drafts))] if rng.random() < 0.8 else []
            tokens = accepted + [rng.randrange(vocab) for _ in range(rng.randint(0, 2))]
            before, crops = list(ctx.cached), len(ctx.crops)
            ctx.extend(tokens)
            # Reference: every cached position whose prefix the new context confirms survives, no other.
            assert len(ctx.cached) == common_prefix(before, ctx.ids)
            assert len(ctx.cached) >= min(len(before), len(ctx.ids) - len(tokens)) + len(accepted)
            # The owner is asked to crop only when something must go, and only downwards.
            new_crops = ctx.crops[crops:]
            assert len(new_crops) == (len(ctx.cached) < len(before))
            assert all(kept < had for had, kept in new_crops)
        check_cache(ctx)
    assert ctx.crops, "the sequence exercised no rollback"


def test_pending_crops_a_fully_cached_context_to_refeed_its_last_token():
    ctx = PrefixCache([4, 5, 6])
    ctx.feed(ctx.pending() + [7, 8])
    ctx.extend([7, 8])  # both drafts accepted: everything committed is cached
    assert ctx.cached == ctx.ids == [4, 5, 6, 7, 8] and ctx.crops == []
    assert ctx.pending() == [8]
    assert ctx.crops == [(5, 4)] and ctx.kv == [(4,), (4, 5), (4, 5, 6), (4, 5, 6, 7)]


def test_both_cached_backends_share_the_rule():
    """The in-process sequence and the split edge's session are the same rollback context."""
    assert issubclass(CachedSequence, RollbackContext) and issubclass(SplitVerifySession, RollbackContext)
    for cls in (CachedSequence, SplitVerifySession):
        assert cls.extend is RollbackContext.extend and cls.pending is RollbackContext.pending
