"""Structured outputs: a grammar (JSON schema, JSON, regex, choice, EBNF) every output must follow.

The grammar engine is xgrammar, vLLM's default. :class:`GrammarCompiler`
compiles a :class:`GrammarSpec` once per request (it caches compiled grammars);
:meth:`Grammar.start` gives each generation its own :class:`GrammarState`, the
grammar stage of decoding.logits_processors.LogitsPipeline.

Under speculation the state keeps one matcher advanced through the committed
output and, beyond it, through pending tokens (the draft, or what the drafter
has proposed so far this round), with the token mask at every position on the
way. Row i of the verifier's k+1 rows gets the mask after ``draft[:i]``; the
drafter's step j gets the mask after its own ``j`` tokens. When the round
commits, the matcher rolls back past the rejected draft tokens
(``GrammarMatcher.rollback``) and advances through the correction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from decoding.sampling import InvalidRequestError

if TYPE_CHECKING:
    from decoding.logits_processors import Rows

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must follow. ``source``: the schema (JSON text), the regex, the EBNF grammar,
    or the list of choices; None for any JSON object. ``param`` names the request field it came from."""

    kind: GrammarKind
    source: str | tuple[str, ...] | None = None
    any_whitespace: bool = True
    param: str = "response_format"


class StructuredOutputError(InvalidRequestError):
    """A grammar that does not compile, or an output the verifier cannot constrain."""


def _engine_message(exc: Exception) -> str:
    # xgrammar prefixes its messages with "[time] file.cc:line: "; the rest is what the user needs.
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc)).strip() or type(exc).__name__


class GrammarCompiler:
    """Compiles grammar specs against one tokenizer (xgrammar's TokenizerInfo), caching the results.

    ``vocab_size`` is the model's logits width (it may exceed the tokenizer's: padding ids are never allowed).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int | None):
        import xgrammar  # imported on first use: a server without structured requests never loads it

        self._xgr = xgrammar
        stop = [eos_token_id] if eos_token_id is not None else None
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)
        self._safe: dict[bool, torch.Tensor] = {}

    def compile(self, spec: GrammarSpec) -> Grammar:
        """Raises StructuredOutputError (a 400 naming ``spec.param``) when the grammar is invalid."""
        c = self._compiler
        try:
            # As vLLM's xgrammar backend: json_object is the schema {"type": "object"}, and "no whitespace"
            # needs compact separators as well as any_whitespace=False.
            separators = None if spec.any_whitespace else (",", ":")
            if spec.kind in ("json_object", "json_schema"):
                schema = '{"type": "object"}' if spec.kind == "json_object" else spec.source
                compiled = c.compile_json_schema(schema, any_whitespace=spec.any_whitespace, separators=separators)
            elif spec.kind == "regex":
                compiled = c.compile_regex(spec.source)
            elif spec.kind == "choice":
                # An EBNF alternation of string literals; JSON's escapes are EBNF's.
                choices = spec.source or ()
                if not choices:
                    raise StructuredOutputError("choice needs at least one option", spec.param)
                compiled = c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in choices))
            else:
                compiled = c.compile_grammar(spec.source)
        except StructuredOutputError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
            raise StructuredOutputError(f"invalid {spec.kind.replace('_', ' ')}: {_engine_message(exc)}", spec.param) from None
        allowed = self._json_safe(spec.any_whitespace) if spec.kind in ("json_object", "json_schema") else None
        return Grammar(compiled, self.vocab_size, tuple(self.info.stop_token_ids), allowed)

    def _json_safe(self, any_whitespace: bool) -> torch.Tensor:
        """Bitmask [words] int32 of the tokens without a control character JSON forbids.

        JSON allows U+0000-U+001F nowhere but \t \n \r as whitespace between tokens; xgrammar 0.2.9's rule
        for strings with minLength/maxLength (``[^"\\\r\n]``) admits the others, and strict parsers
        (pydantic, JavaScript) then reject the output. Masking those tokens closes that gap.
        """
        cached = self._safe.get(any_whitespace)
        if cached is None:
            bad = set(range(32)) - ({9, 10, 13} if any_whitespace else set())
            words = [0] * ((self.vocab_size + 31) // 32)
            for token, text in enumerate(self.info.decoded_vocab[: self.vocab_size]):
                if not bad.intersection(text):
                    words[token // 32] |= 1 << (token % 32)
            cached = self._safe[any_whitespace] = _int32(words)
        return cached


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, shared by the choices of a request; :meth:`start` one state per generation."""

    compiled: Any  # xgrammar.CompiledGrammar
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    #: A bitmask [words] int32 ANDed with every mask (tokens the grammar engine wrongly admits); None: none.
    allowed: torch.Tensor | None = None

    def start(self) -> GrammarState:
        return GrammarState(self)


class GrammarState:
    """One generation's grammar: a matcher advanced through the committed output, and beyond it through
    pending tokens, with the token bitmask at each of those positions (see the module docstring)."""

    def __init__(self, grammar: Grammar):
        import xgrammar

        self._xgr = xgrammar
        self.grammar = grammar
        self.matcher = xgrammar.GrammarMatcher(grammar.compiled)
        self.words = (grammar.vocab_size + 31) // 32
        self.pending: list[int] = []  # tokens accepted beyond the committed output
        self.taken: list[bool] = []  # per pending token: did the matcher consume it
        self.masks: list[torch.Tensor] = [self._fill()]  # masks[i]: the bitmask after pending[:i], [words] int32

    def _fill(self) -> torch.Tensor:
        if self.matcher.is_terminated():
            # The grammar has ended and its stop token was accepted: only a stop token may follow
            # (a row the router discards, but whose distribution must still be valid).
            words = [0] * self.words
            for t in self.grammar.stop_token_ids:
                words[t // 32] |= 1 << (t % 32)
            return _int32(words)
        mask = self._xgr.allocate_token_bitmask(1, self.grammar.vocab_size)
        self.matcher.fill_next_token_bitmask(mask)
        if self.grammar.allowed is not None:
            mask[0] &= self.grammar.allowed
        return mask[0]

    def _advance(self, tokens: Sequence[int]) -> int:
        """Move the matcher to committed + ``tokens``; return how many of them the grammar accepts."""
        common = 0
        for mine, theirs in zip(self.pending, tokens):
            if mine != theirs:
                break
            common += 1
        if len(self.pending) > common:
            # Only tokens the matcher itself took count for rollback (not stop tokens after its end).
            self.matcher.rollback(sum(self.taken[common:]))
            del self.pending[common:]
            del self.taken[common:]
            del self.masks[common + 1 :]
        for t in tokens[common:]:
            if self.matcher.is_terminated():
                # After the grammar's end only stop tokens may follow (a drafter may draft past EOS);
                # the router stops at the first of them anyway.
                if t not in self.grammar.stop_token_ids:
                    break
                taken = False
            elif self.matcher.accept_token(t):
                taken = True
            else:
                break
            self.pending.append(t)
            self.taken.append(taken)
            self.masks.append(self._fill())
        return len(self.pending)

    def admissible(self, draft: Sequence[int]) -> int:
        return self._advance(draft)

    def mask(self, logits: torch.Tensor, rows: Rows) -> None:
        """logits [n, V]: set the tokens the grammar forbids after each row's prefix to -inf, in place."""
        last = rows.prefix(rows.n - 1)
        if self._advance(last) < len(last):
            raise StructuredOutputError("a pending token violates the grammar (the draft was not cut)", None)
        bitmask = torch.stack([self.masks[rows.start + i] for i in range(rows.n)])
        if logits.device.type == "cpu":
            self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.grammar.vocab_size)
        else:
            self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                                  vocab_size=self.grammar.vocab_size)  # fmt: skip
        if torch.isneginf(logits).all(dim=-1).any():
            # Only with a verifier that returns its top-K logprobs: every allowed token was outside them.
            raise StructuredOutputError(
                "no token the grammar allows is among the verifier's returned candidates; raise the verifier's "
                "top-K (verifier_top_logprobs) or use an in-process verifier for structured outputs", None,
            )  # fmt: skip

    def commit(self, tokens: Sequence[int]) -> None:
        """The round's tokens are final: keep the matcher there and forget the rest of the pending state."""
        if self._advance(tokens) < len(tokens):
            raise StructuredOutputError("a committed token violates the grammar", None)
        self.masks = self.masks[len(tokens) :]
        self.pending = []
        self.taken = []



def _int32(words: list[int]) -> torch.Tensor:
    """32-bit words (as unsigned ints) -> an int32 bitmask tensor; bit 31 is the sign bit."""
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
