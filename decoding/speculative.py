"""The speculative-decoding router: the edge drafter proposes, the verifier decides.

One round, top to bottom in :meth:`SpeculativeRouter.stream`:

1. the drafter proposes k tokens (k adapts to the recent acceptance);
2. the verifier scores context + draft in one pass: k+1 target distributions;
3. ``kernels.verify_drafts`` accepts a prefix of the draft and emits one
   correction (first rejection) or bonus (all accepted) token;
4. both sides commit the accepted tokens, rolling their caches back past the
   rejected ones, and the round's tokens are streamed out.

Greedy output is token-identical to the verifier alone; sampled output has the
verifier's exact distribution (after temperature/top-k/top-p, applied to both
models alike). ``verifier-only`` is the same loop with k = 0, and
``drafter-only`` skips verification altogether.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

import kernels
from decoding.batching import AcceptBatcher
from decoding.detokenizer import IncrementalDetokenizer
from decoding.drafters import EMPTY_DRAFT, Draft, Drafter
from decoding.events import RoundEvent
from decoding.logits_processors import LogitsPipeline
from decoding.logprobs import TokenLogprob, token_logprobs
from decoding.modes import MODES, Mode
from decoding.sampling import InvalidRequestError, SamplingParams, logits_to_probs
from decoding.stream_policy import StreamPolicy
from decoding.structured import Grammar, GrammarCompiler, GrammarSpec
from decoding.verifiers import Verifier, VerifierUnavailableError

MAX_DRAFT_TOKENS = 32


@dataclass(frozen=True)
class SpecOptions:
    """Per-request decoding options (the API's ``tandem`` object)."""

    mode: Mode = "speculative"
    num_draft_tokens: int = 4  # k of the first round
    min_draft_tokens: int = 1
    max_draft_tokens: int = 8
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}", "tandem.mode")
        for name in ("num_draft_tokens", "min_draft_tokens", "max_draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_TOKENS:
                raise InvalidRequestError(
                    f"{name} must be an integer in [1, {MAX_DRAFT_TOKENS}], got {value!r}", f"tandem.{name}"
                )
        if not self.min_draft_tokens <= self.max_draft_tokens:
            raise InvalidRequestError(
                f"min_draft_tokens ({self.min_draft_tokens}) must not exceed max_draft_tokens ({self.max_draft_tokens})",
                "tandem.min_draft_tokens",
            )


@dataclass
class GenerationStats:
    """Per-request statistics; ``to_dict`` is what the API and CLI report."""

    mode: str = "speculative"
    rounds: int = 0
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    fully_accepted_rounds: int = 0  # rounds whose whole draft was accepted (bonus token)
    #: drafted_per_position[i]: rounds that proposed a draft at position i;
    #: accepted_per_position[i]: rounds whose draft at position i was accepted.
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    verifier_forward_passes: int = 0
    drafter_forward_passes: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    total_time_s: float = 0.0
    draft_length: int = 0  # the adaptive k the next round would draft
    fallback: str | None = None  # "drafter-only" when the verifier failed and the request went on without it

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def alpha(self) -> float | None:
        """Per-token acceptance probability, estimated as a truncated geometric:
        accepted tokens / (accepted tokens + rejections). Unlike the acceptance
        rate it does not count drafts after a rejection, which were never tested."""
        rejections = self.rounds - self.fully_accepted_rounds
        return self.accepted_tokens / (self.accepted_tokens + rejections) if self.draft_tokens else None

    @property
    def mean_accepted_per_round(self) -> float | None:
        return self.accepted_tokens / self.rounds if self.rounds else None

    @property
    def overhead_time_s(self) -> float:
        return max(0.0, self.total_time_s - self.draft_time_s - self.verify_time_s)

    def record(self, event: RoundEvent) -> None:
        """Fold one round into the totals (the router calls this once per round)."""
        self.generated_tokens += event.emitted
        self.draft_time_s += event.draft_s
        self.verify_time_s += event.verify_s
        if event.fallback:
            self.fallback = event.fallback
        if not event.verified:
            return
        k, num_accepted = event.k, event.accepted
        self.rounds += 1
        self.fully_accepted_rounds += num_accepted == k
        self.draft_tokens += k
        self.accepted_tokens += num_accepted
        self.draft_length = event.next_k
        grow = k - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(k):
            self.drafted_per_position[i] += 1
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    def snapshot(self) -> GenerationStats:
        """A copy that later rounds do not change (what each Chunk carries)."""
        return replace(
            self,
            drafted_per_position=list(self.drafted_per_position),
            accepted_per_position=list(self.accepted_per_position),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate
        d["alpha"] = self.alpha
        d["mean_accepted_per_round"] = self.mean_accepted_per_round
        d["overhead_time_s"] = self.overhead_time_s
        return d


@dataclass(frozen=True)
class Chunk:
    """The output of one round: the tokens it committed, the text now final, what the
    round did (``event``) and the request's totals so far (``stats``, a snapshot)."""

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"] | None
    event: RoundEvent
    stats: GenerationStats
    #: What stopped the generation (vLLM's ``stop_reason``): the stop string, or the stop token id
    #: other than EOS; None for EOS, length, or a chunk that does not finish.
    stop_reason: int | str | None = None
    #: With ``params.logprobs``: one entry per token of ``token_ids`` (decoding/logprobs.py).
    logprobs: list[TokenLogprob] | None = None
    #: With ``params.prompt_logprobs``, on the first chunk only: one entry per prompt token after the first.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class AcceptanceTracker:
    """Chooses k from recent acceptance with the classic cost model.

    With per-token acceptance α and drafter/verifier cost ratio c, a round with
    k drafts yields (1 - α^(k+1)) / (1 - α) tokens for k·c + 1 verifier-pass
    equivalents. α is estimated from recent rounds as a truncated geometric
    (accepted tokens vs. rejections, exponentially decayed), so the choice
    depends only on the request's own history: a seeded request stays
    reproducible.
    """

    def __init__(self, options: SpecOptions, cost_ratio: float, decay: float = 0.7):
        self.options = options
        self.cost_ratio = cost_ratio
        self.decay = decay
        self.accepted = 2.0  # prior: α ≈ 2/3
        self.rejected = 1.0
        self.k = options.num_draft_tokens

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, k: int, num_accepted: int) -> int:
        if k == 0 or not self.options.adaptive:
            return self.k
        self.accepted = self.decay * self.accepted + num_accepted
        self.rejected = self.decay * self.rejected + (1.0 if num_accepted < k else 0.0)
        a = min(self.alpha, 0.999)
        lo, hi = self.options.min_draft_tokens, self.options.max_draft_tokens
        # Ties (to 9 digits) go to the shorter draft.
        self.k = max(range(lo, hi + 1), key=lambda n: (round(classic_speedup(a, n, self.cost_ratio), 9), -n))
        return self.k


class CostEstimator:
    """The drafter/verifier cost ratio c of the classic model, one per router.

    In process, c is the ratio of the two models' forward costs, known up front
    (the parameter ratio, or ``draft_cost_ratio``): k then depends only on the
    request's own acceptance history, so seeded requests reproduce. When
    ``measured``, c is learnt from the rounds themselves (moving averages of
    seconds per draft token and seconds per verification), because for a remote
    verifier one verification is a network round trip whose cost no parameter
    count predicts: the best k then grows with the RTT. Until both are observed
    it reports the prior.
    """

    def __init__(self, prior: float, measured: bool = False, smoothing: float = 0.1):
        self.prior = prior
        self.measured = measured
        self.smoothing = smoothing
        self.draft_token_s: float | None = None
        self.verify_s: float | None = None

    @property
    def ratio(self) -> float:
        if not self.measured or self.draft_token_s is None or not self.verify_s:
            return self.prior
        return self.draft_token_s / self.verify_s

    def observe(self, event: RoundEvent) -> None:
        if not self.measured or not event.verified:
            return
        self.verify_s = self._average(self.verify_s, event.verify_s)
        if event.k > 0:
            self.draft_token_s = self._average(self.draft_token_s, event.draft_s / event.k)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new


class SpeculativeRouter:
    """Collaborative decoding of one request at a time (many may run concurrently).

    ``drafter`` may be None when only ``verifier-only`` is served.
    """

    def __init__(
        self,
        verifier: Verifier,
        drafter: Drafter | None,
        tokenizer: PreTrainedTokenizerBase,
        options: SpecOptions = SpecOptions(),
        kernel_backend: kernels.Backend = "auto",
        fallback: Literal["none", "drafter-only"] = "none",
        measure_cost: bool = False,
    ):
        if drafter is not None and drafter.vocab_size != verifier.vocab_size:
            raise ValueError(
                f"drafter vocabulary size {drafter.vocab_size} differs from the verifier's {verifier.vocab_size}"
            )
        self.verifier = verifier
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.options = options
        self.kernel_backend = kernel_backend
        self.acceptor = AcceptBatcher(kernel_backend)
        #: What to do when the verifier is unavailable mid-request: fail
        #: (VerifierUnavailableError, HTTP 503) or finish the request with the
        #: drafter alone, flagged in the statistics as ``fallback``.
        self.fallback = fallback
        self.cost = CostEstimator(drafter.cost_ratio if drafter else 0.0, measured=measure_cost)
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        #: For a verifier that can also generate by itself over one stream (a remote vLLM):
        #: ``verifier-only`` streams, and ``speculative`` streams while that is measured to be faster.
        self.stream_policy = StreamPolicy() if hasattr(verifier, "stream_tokens") else None

    # -- request checks -------------------------------------------------------

    async def compile_grammar(self, spec: GrammarSpec) -> Grammar:
        """Compile a structured-output grammar for this router's tokenizer (off the event loop; cached)."""
        if self._grammars is None:
            self._grammars = await asyncio.to_thread(
                GrammarCompiler, self.tokenizer, self.verifier.vocab_size, self.eos_token_id
            )
        return await asyncio.to_thread(self._grammars.compile, spec)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams, options: SpecOptions) -> None:
        """Raise InvalidRequestError naming the problem; see also SamplingParams.validate."""
        if len(prompt_ids) == 0:
            raise InvalidRequestError("prompt is empty: give at least one token", "prompt")
        vocab = self.verifier.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt contains token id {bad!r} outside the vocabulary [0, {vocab})", "prompt")
        params.check_vocabulary(vocab)
        limit = self.verifier.max_context
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                f"prompt is {len(prompt_ids)} tokens; this model's maximum context length is {limit} tokens",
                "prompt",
                code="context_length_exceeded",
            )
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but {len(prompt_ids)} prompt tokens "
                f"+ max_tokens {params.max_tokens} exceed it",
                "max_tokens",
                code="context_length_exceeded",
            )
        if params.prompt_logprobs is not None and not hasattr(self.verifier, "prompt_logits"):
            raise InvalidRequestError("prompt logprobs (echo with logprobs) need an in-process verifier", "echo")
        if options.mode != "verifier-only" and self.drafter is None:
            raise InvalidRequestError(f"mode {options.mode!r} needs a drafter and none is configured", "tandem.mode")

    # -- the loop --------------------------------------------------------------

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, options: SpecOptions | None = None
    ) -> Generation:
        token_ids: list[int] = []
        text: list[str] = []
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        prompt_logprobs = None
        chunk = None
        async for chunk in self.stream(prompt_ids, params, options):
            token_ids += chunk.token_ids
            text.append(chunk.text)
            if logprobs is not None and chunk.logprobs:
                logprobs += chunk.logprobs
            prompt_logprobs = prompt_logprobs or chunk.prompt_logprobs
        assert chunk is not None and chunk.finish_reason is not None
        return Generation(list(prompt_ids), token_ids, "".join(text), chunk.finish_reason, chunk.stats, chunk.stop_reason,
                          logprobs, prompt_logprobs)  # fmt: skip

    async def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, options: SpecOptions | None = None
    ) -> AsyncIterator[Chunk]:
        """Yield one :class:`Chunk` per round until EOS, a stop string or max_tokens.

        Cancelling the consumer (closing the generator) stops within one round
        and releases both sessions' caches.
        """
        options = options or self.options
        prompt_ids = list(prompt_ids)
        self.check_request(prompt_ids, params, options)
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        generators = Generators(seed)
        stats = GenerationStats(mode=options.mode)
        t_start = time.perf_counter()
        mode = options.mode  # becomes "drafter-only" if the verifier fails and fallback is on
        fallback: str | None = None  # reported on the round where the switch happened
        generated: list[int] = []
        verify = draft = None
        live = None  # an open stream from the verifier, while streaming beats rounds (see decoding.stream_policy)
        shadow: tuple[list[int], list[int]] | None = None  # a draft measured against the stream: (proposed, seen)
        switched: str | None = None
        tracker = AcceptanceTracker(options, self.cost.ratio)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, include_stop=params.include_stop_str_in_output,
                                       skip_special_tokens=params.skip_special_tokens)  # fmt: skip
        limit = params.max_tokens  # check_request: prompt + max_tokens fit the context
        grammar = params.grammar.start() if params.grammar is not None else None
        # None for a request without penalties, bias, min_p, ... : it pays nothing for them.
        processing = LogitsPipeline.build(params, prompt_ids, self.verifier.vocab_size, self.eos_token_id, grammar)
        stop_ids = self._stop_ids(params)
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            rows = await self.verifier.prompt_logits(prompt_ids)  # type: ignore[attr-defined]
            prompt_logprobs = token_logprobs(rows, prompt_ids[1:], params.prompt_logprobs)
        # A remote verifier may stream or decide rounds itself, where the full distribution lives; it
        # then applies the request's sampling parameters but not tandem's processors, grammar or logprobs.
        remote_ok = processing is None and params.logprobs is None
        try:
            if mode != "drafter-only":
                try:
                    verify = await self.verifier.start(prompt_ids)
                except VerifierUnavailableError:
                    mode = fallback = self._fall_back()
            if mode != "verifier-only":
                draft = self.drafter.start(prompt_ids, params, generators.on(self.drafter.device), processing)
            while True:
                budget = limit - stats.generated_tokens
                transport = None
                logprob_rows = None  # [n, V]: the logits each emitted token was drawn from (for logprobs)
                streamed = False
                if mode != "drafter-only":
                    want_stream = remote_ok and self._wants_stream(mode, params, tracker, live is not None)
                    if live is not None and not want_stream:
                        await live.aclose()
                        live, shadow, switched = None, None, "rounds"
                    elif live is None and want_stream:
                        round_seed = int(torch.randint(0, 2**62, (1,), generator=generators.on("cpu")))
                        live = self.verifier.stream_tokens(prompt_ids + generated, params, budget, round_seed)
                        live_opened, live_first, live_tokens, shadow_s = time.perf_counter(), None, 0, 0.0
                        switched = "stream" if mode == "speculative" else None
                if live is not None:
                    # One stream from the verifier: each chunk of tokens it sends is this loop's "round".
                    t0 = time.perf_counter()
                    # Keep measuring acceptance with the drafter, on at most a tenth of the stream's time.
                    shadow_k = min(tracker.k, budget - 1)
                    shadow_cost = shadow_k * (self.stream_policy.draft_token_s or 0.0)
                    if mode == "speculative" and shadow is None and shadow_k > 0 and (
                        shadow_s + shadow_cost <= 0.1 * (t0 - live_opened)
                    ):
                        shadow = ((await draft.propose(shadow_k)).tokens, [])
                        shadow_s += time.perf_counter() - t0
                        t0 = time.perf_counter()
                    try:
                        got = await anext(live, None)
                        if got is None and not live_tokens:
                            raise VerifierUnavailableError(f"verifier {self.verifier.name}: the stream ended at once")
                    except VerifierUnavailableError:
                        live = None
                        mode = fallback = self._fall_back()
                        await self._close(verify)
                        verify = None
                        draft = self._drafter_alone(draft, prompt_ids + generated, params, generators, processing)
                        continue
                    if got is None:  # the server ended it early (e.g. its own length limit): go on with a new one
                        live = None
                        continue
                    now = time.perf_counter()
                    live_tokens += len(got.tokens)
                    if live_first is None:  # the first chunk carries the round trip and the prefill
                        live_first, first_tokens = now, live_tokens
                    else:  # then the pace this edge gets, its own drafting included
                        self.stream_policy.observe_stream(now - live_first, live_tokens - first_tokens)
                    new_tokens, transport, streamed = got.tokens, got.transport, True
                    k = num_accepted = 0
                    draft_s, verify_s = 0.0, now - t0
                    if shadow is not None:
                        shadow = self._measure_shadow(shadow, new_tokens, tracker)
                elif mode == "drafter-only":
                    t0 = time.perf_counter()
                    proposal = self._admissible(await draft.propose(1), processing)
                    draft_s, verify_s = time.perf_counter() - t0, 0.0
                    new_tokens = proposal.tokens
                    logprob_rows = proposal.logits
                    k = num_accepted = 0
                else:
                    # Every round emits one verifier token, so draft at most budget - 1.
                    k = min(tracker.k, budget - 1) if mode == "speculative" else 0
                    t0 = time.perf_counter()
                    proposal = self._admissible(await draft.propose(k), processing) if k > 0 else EMPTY_DRAFT
                    t1 = time.perf_counter()
                    try:
                        if remote_ok and getattr(verify, "decides", False):  # verified where the full distribution is
                            round_seed = int(torch.randint(0, 2**62, (1,), generator=generators.on("cpu")))
                            decided = await verify.decide(proposal.tokens, params, round_seed)
                        else:
                            decided = None
                            logits = await verify.score(proposal.tokens)
                    except VerifierUnavailableError:
                        mode = fallback = self._fall_back()
                        await self._close(verify)
                        verify = None
                        draft = self._drafter_alone(draft, prompt_ids + generated, params, generators, processing)
                        continue
                    draft_s, verify_s = t1 - t0, time.perf_counter() - t1
                    transport = verify.last_transport
                    stats.verifier_forward_passes = verify.forward_passes
                    k = len(proposal.tokens)  # a drafter may propose fewer than asked
                    if decided is not None:
                        new_tokens, num_accepted = decided
                    elif processing is not None:
                        # Row i follows the context + draft[:i]: each row gets that position's processing.
                        processing.constrain(logits, proposal.tokens)
                        if params.logprobs is not None:
                            logprob_rows = logits.clone()
                        processing.process(logits, proposal.tokens)
                    elif params.logprobs is not None:
                        logprob_rows = logits
                    if decided is None:
                        new_tokens, num_accepted = await self._accept(proposal, logits, params, generators.on(logits.device))
                    if mode == "speculative":
                        tracker.update(k, num_accepted)

                finish: Literal["stop", "length"] | None = None
                stop_reason: int | str | None = None
                shown = new_tokens  # the tokens whose text the output shows
                stop_at = next((i for i, t in enumerate(new_tokens) if t in stop_ids), None)
                if stop_at is not None:
                    token = new_tokens[stop_at]
                    new_tokens = new_tokens[: stop_at + 1]
                    finish = "stop"
                    stop_reason = None if token == self.eos_token_id and not params.ignore_eos else token
                    # vLLM: the stop token's text is not part of the output, unless asked for.
                    shown = new_tokens if params.include_stop_str_in_output else new_tokens[:stop_at]
                new_tokens = new_tokens[:budget]
                shown = shown[:budget]
                generated += new_tokens
                event = RoundEvent(
                    k=k,
                    accepted=num_accepted,
                    emitted=len(new_tokens),
                    verified=mode != "drafter-only",
                    draft_s=draft_s,
                    verify_s=verify_s,
                    next_k=tracker.k if mode == "speculative" else 0,
                    fallback=fallback,
                    transport=transport,
                    streamed=streamed,
                    switched=switched,
                )
                fallback = switched = None
                stats.record(event)
                if not streamed:
                    self.cost.observe(event)
                if self.stream_policy is not None:
                    self.stream_policy.observe_round(event)
                # Stop strings count only from min_tokens on (vLLM).
                early = max(0, min(len(shown), params.min_tokens - (stats.generated_tokens - len(new_tokens))))
                text = detok.push(shown[:early], check_stop=False) + detok.push(shown[early:]) if early else detok.push(shown)
                if detok.stopped:
                    finish, stop_reason = "stop", detok.stop_reason
                elif finish is None and stats.generated_tokens >= limit:
                    finish = "length"
                elif not new_tokens:  # drafter-only with a drafter that has nothing to say
                    finish = "stop"
                if finish is not None:
                    text += detok.flush()
                else:
                    if verify is not None:
                        verify.extend(new_tokens)
                    if draft is not None:
                        draft.extend(new_tokens)
                    if processing is not None:
                        processing.commit(new_tokens)
                logprobs = None
                if params.logprobs is not None and logprob_rows is not None:
                    logprobs = token_logprobs(logprob_rows, new_tokens, params.logprobs)
                stats.drafter_forward_passes = draft.forward_passes if draft else 0
                stats.total_time_s = time.perf_counter() - t_start
                yield Chunk(token_ids=new_tokens, text=text, finish_reason=finish, event=event, stats=stats.snapshot(),
                            stop_reason=stop_reason, logprobs=logprobs, prompt_logprobs=prompt_logprobs)  # fmt: skip
                prompt_logprobs = None
                if finish is not None:
                    return
        finally:
            if live is not None:
                with contextlib.suppress(Exception):
                    await live.aclose()  # the server aborts the generation
            await self._close(verify)
            await self._close(draft)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a generation: EOS (unless ignored) and the request's stop_token_ids."""
        eos = () if params.ignore_eos or self.eos_token_id is None else (self.eos_token_id,)
        return frozenset((*eos, *params.stop_token_ids))

    @staticmethod
    def _admissible(proposal: Draft, processing: LogitsPipeline | None) -> Draft:
        """Cut a draft at the first token the grammar forbids (a deterministic drafter does not know it)."""
        if processing is None or processing.grammar is None or not proposal.tokens:
            return proposal
        n = processing.admissible(proposal.tokens)
        if n == len(proposal.tokens):
            return proposal
        return Draft(
            tokens=proposal.tokens[:n],
            probs=None if proposal.probs is None else proposal.probs[:n],
            logits=None if proposal.logits is None else proposal.logits[:n],
        )

    def _wants_stream(self, mode: str, params: SamplingParams, tracker: AcceptanceTracker, streaming: bool) -> bool:
        """Whether the verifier's own stream should produce the next tokens (see decoding.stream_policy).

        A seeded sampled request never switches: which tokens it draws would then depend on timing,
        and seeded requests reproduce (both ways are exact in distribution).
        """
        if self.stream_policy is None or not getattr(self.verifier, "streams", False):
            return False
        if mode == "verifier-only":
            return True  # one request, one round trip: never a round per token
        if mode != "speculative" or (params.seed is not None and not params.greedy):
            return False
        return self.stream_policy.prefer_stream(tracker.alpha, tracker.k, streaming)

    @staticmethod
    def _measure_shadow(
        shadow: tuple[list[int], list[int]], tokens: list[int], tracker: AcceptanceTracker
    ) -> tuple[list[int], list[int]] | None:
        """Keep measuring acceptance while streaming: a draft proposed where the stream stood is
        judged by the tokens the stream then sends. The verification rule accepts a draft token d
        with probability p(d), which is exactly the chance that the stream samples d, so the
        matching prefix is an unbiased acceptance sample (greedy or not)."""
        proposed, seen = shadow
        seen = seen + tokens
        if len(seen) < len(proposed):
            return proposed, seen
        accepted = next((i for i, (a, b) in enumerate(zip(proposed, seen)) if a != b), len(proposed))
        tracker.update(len(proposed), accepted)
        return None

    def _drafter_alone(self, draft, context: list[int], params: SamplingParams, generators: Generators,
                       processing: LogitsPipeline | None):  # fmt: skip
        """The draft session that carries on after the verifier failed: a new one on the committed
        ``context`` (a verifier-only request had none), or the open one rolled back to it (a round's,
        or a shadow measurement's, unverified drafts are dropped)."""
        if draft is None:
            return self.drafter.start(context, params, generators.on(self.drafter.device), processing)
        draft.extend([])
        return draft

    def _fall_back(self) -> str:
        """Switch the request to drafter-only, or re-raise when that is not configured."""
        if self.fallback != "drafter-only" or self.drafter is None:
            raise  # called from an except block: re-raises the VerifierUnavailableError
        return "drafter-only"

    @staticmethod
    async def _close(session) -> None:
        if session is not None:
            with contextlib.suppress(Exception):  # a dead verifier must not mask the real outcome
                await session.close()

    async def _accept(
        self, proposal: Draft, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
    ) -> tuple[list[int], int]:
        """Run the verification maths of one round, on the device the verifier's logits live on.

        logits: [k+1, V] float32 from the verifier; ``generator`` lives on the same
        device. Concurrent rounds share one kernel call (:class:`AcceptBatcher`).
        Returns (the accepted drafts plus one correction or bonus token, accepted).
        """
        if params.greedy:
            return await self.acceptor.accept(proposal.tokens, logits, None, None)
        target = logits_to_probs(logits, params)
        # A deterministic proposal (greedy drafting, n-gram lookup) has no probs: the
        # kernels treat it as a point mass at each draft without materialising [k, V].
        q = None if proposal.probs is None else proposal.probs.to(logits.device, non_blocking=True)
        return await self.acceptor.accept(proposal.tokens, target, q, generator)


class Generators:
    """One seeded ``torch.Generator`` per device a request samples on.

    The drafter samples where it runs and the verification maths runs where the
    verifier's logits are; a CUDA tensor cannot be sampled with a CPU generator,
    so each device gets its own stream. Each device's seed is derived from the
    request seed and the device alone, so a seeded request stays reproducible;
    when everything runs on one device there is exactly one generator.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._by_device: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._by_device.get(device)
        if gen is None:
            seed = self.seed if device.type == "cpu" else (self.seed * 1_000_003 + zlib.crc32(str(device).encode())) % 2**63
            gen = self._by_device[device] = torch.Generator(device).manual_seed(seed)
        return gen


def classic_speedup(alpha: float, k: float, cost_ratio: float) -> float:
    """Expected speedup of speculative decoding (Leviathan et al. 2023, eq. 1 with c)."""
    if alpha >= 1:
        return (k + 1) / (k * cost_ratio + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * cost_ratio + 1))


__all__ = [
    "Chunk",
    "CostEstimator",
    "Generation",
    "GenerationStats",
    "MODES",
    "Mode",
    "SpecOptions",
    "SpeculativeRouter",
    "classic_speedup",
]
