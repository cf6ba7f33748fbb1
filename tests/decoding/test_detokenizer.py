"""Incremental detokenization: streamed text equals a full decode, stop strings never leak."""

from __future__ import annotations

import pytest

from decoding.detokenizer import IncrementalDetokenizer


def stream(tokenizer, ids, stop=(), step=3):
    detok = IncrementalDetokenizer(tokenizer, stop)
    parts = []
    for i in range(0, len(ids), step):
        parts.append(detok.push(ids[i : i + step]))
        if detok.stopped:
            break
    parts.append(detok.flush())
    return parts, detok


@pytest.mark.parametrize("step", [1, 2, 5])
def test_streamed_text_equals_full_decode_including_multibyte(tiny_tokenizer, step):
    text = "def naïve(x):\n    return 'héllo wörld ✓ 日本語' * x  # ünïcode\n"
    ids = tiny_tokenizer.encode(text)
    parts, _ = stream(tiny_tokenizer, ids, step=step)
    assert "".join(parts) == tiny_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)  # no half characters were ever released


@pytest.mark.parametrize("step", [1, 4])
def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tiny_tokenizer, step):
    text = "alpha = 1\nbeta = 2\n# END of block\ngamma = 3\n"
    ids = tiny_tokenizer.encode(text)
    parts, detok = stream(tiny_tokenizer, ids, stop=("# END", "zzz"), step=step)
    assert detok.stopped
    assert "".join(parts) == "alpha = 1\nbeta = 2\n"
    assert not any("#" in p for p in parts)


def test_earliest_of_several_stop_strings_wins(tiny_tokenizer):
    ids = tiny_tokenizer.encode("one two three four")
    parts, _ = stream(tiny_tokenizer, ids, stop=("four", "two"), step=100)
    assert "".join(parts) == "one "
