"""Speculative rounds or one plain stream from the verifier: which is faster for a remote verifier, measured.

A remote verifier that can also generate on its own (vLLM) offers two ways to
produce the verifier's tokens:

- speculative rounds: each round costs the drafter's k steps, one network
  round trip and one verification on the server, and yields
  ``(1 - α^(k+1)) / (1 - α)`` tokens on average (α: per-token acceptance);
- one streaming request: the server generates by itself; the round trip is
  paid once and each token costs one engine step.

At a high RTT (or with a poor drafter) streaming wins; at a low RTT with a good
drafter speculation does. :class:`StreamPolicy` keeps moving averages of what
it observes (per router: RTT = round time minus the server's own time, the
server's time per verification, the drafter's time per token, the stream's
time per token) and answers :meth:`prefer_stream` for a request's current α
and k. Until the stream's own step time has been seen, one verification's
server time stands in for it (an overestimate: a round does more than a step),
so the first switch to streaming happens only when it clearly pays.
"""

from __future__ import annotations

from dataclasses import dataclass

from decoding.events import RoundEvent


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one speculative round yields on average: accepted drafts plus one correction or bonus token."""
    if k <= 0:
        return 1.0
    if alpha >= 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class StreamPolicy:
    """Measured costs of the two ways, and the choice between them (see the module docstring)."""

    smoothing: float = 0.2
    #: Streaming must beat speculation by this factor to be chosen (and vice versa): no flapping.
    hysteresis: float = 0.1
    rtt_s: float | None = None
    server_s: float | None = None  # the server's time per verification round
    draft_token_s: float | None = None
    step_s: float | None = None  # the stream's time per token, measured between tokens

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe_round(self, event: RoundEvent) -> None:
        t = event.transport
        if not event.verified or t is None or t.server_s is None or t.round_trips != 1 or t.retries:
            return  # only clean rounds measure the network
        self.server_s = self._avg(self.server_s, t.server_s)
        self.rtt_s = self._avg(self.rtt_s, max(0.0, t.round_s - t.server_s))
        if event.k > 0:
            self.draft_token_s = self._avg(self.draft_token_s, event.draft_s / event.k)

    def observe_stream(self, seconds: float, tokens: int) -> None:
        """A running stream's pace: ``tokens`` received in ``seconds`` after its first chunk."""
        if tokens > 0 and seconds > 0:
            self.step_s = seconds / tokens

    def stream_tokens_per_s(self) -> float | None:
        step = self.step_s if self.step_s is not None else self.server_s
        return 1.0 / step if step else None

    def rounds_tokens_per_s(self, alpha: float, k: int) -> float | None:
        if self.rtt_s is None or self.server_s is None:
            return None
        round_s = k * (self.draft_token_s or 0.0) + self.rtt_s + self.server_s
        return expected_tokens(alpha, k) / round_s if round_s > 0 else None

    def prefer_stream(self, alpha: float, k: int, streaming: bool) -> bool:
        """Whether the request should stream now (``streaming``: it does already; hysteresis keeps it so)."""
        stream, rounds = self.stream_tokens_per_s(), self.rounds_tokens_per_s(alpha, k)
        if stream is None or rounds is None:
            return streaming
        margin = 1 - self.hysteresis if streaming else 1 + self.hysteresis
        return stream > rounds * margin
