"""Incremental detokenization with stop strings.

Text is released as soon as it can no longer change: bytes of an unfinished
UTF-8 character are held back, and so is any tail that could still grow into
a stop string, so a streamed response never shows text that a stop string
later removes.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# A few tokens of context before the new ones, so that tokenizers whose
# decoding depends on the neighbour (leading spaces, byte fallback) agree with
# a full decode. Same idea as vLLM's prefix/read offsets.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: Sequence[str] = (),
        *,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        #: Keep the stop string at the end of the text (vLLM's include_stop_str_in_output).
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        #: The stop string that ended the text, once ``stopped``.
        self.stop_reason: str | None = None
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # decoded so far, including the held-back tail
        self._emitted = 0  # characters of ``text`` already released
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Sequence[int], check_stop: bool = True) -> str:
        """Add generated tokens; return the text that is now final.

        After a stop string is found, ``stopped`` is True and the returned text
        ends right before it (or right after it, with ``include_stop``).
        ``check_stop=False`` adds text no stop string may end in (vLLM's min_tokens).
        """
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        full = self._decode(self.ids[self._prefix_offset :])
        if full.endswith("\ufffd"):
            return self._release(final=False)  # an unfinished multi-byte character
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        search_from = max(0, len(self.text) - self._holdback)
        self.text += full[len(prefix) :]
        self._read_offset = len(self.ids)
        self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        if not check_stop:
            search_from = len(self.text)  # a stop string must end after this text
        hits = [(at, s) for s in self.stop if (at := self.text.find(s, search_from)) != -1]
        if hits:  # the earliest stop string wins
            at, self.stop_reason = min(hits)
            self.text = self.text[: at + len(self.stop_reason) if self.include_stop else at]
            self.stopped = True
            return self._release(final=True)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is held back, at the end of generation."""
        if self.stopped:
            return ""
        if self._read_offset < len(self.ids):  # trailing unfinished character
            self.text += self._decode(self.ids[self._prefix_offset :])[
                len(self._decode(self.ids[self._prefix_offset : self._read_offset])) :
            ]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
