"""Streaming text deltas: multi-byte characters and stop strings spanning several tokens."""

from __future__ import annotations

from chatforge.inference.text import IncrementalDecoder, find_stop, truncate_at_stop


def _stream(tokenizer, text: str, stop: list[str] = ()) -> tuple[list[str], IncrementalDecoder]:
    decoder = IncrementalDecoder(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        deltas.append(decoder.push(token))
        if decoder.stopped:
            break
    deltas.append(decoder.finish())
    return [d for d in deltas if d], decoder


def test_multibyte_characters_are_never_split(tokenizer):
    text = "héllo 世界 € ok 🙂!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()), (
        "the fixture tokenizer should split these characters into byte tokens"
    )
    deltas, decoder = _stream(tokenizer, text)
    assert "".join(deltas) == text == decoder.sent
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_tokens_is_held_back_and_cut(tokenizer):
    deltas, decoder = _stream(tokenizer, "The answer is 7.\nUser: more text", stop=["\nUser:"])
    assert decoder.stopped
    assert "".join(deltas) == "The answer is 7."
    assert all("\n" not in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tokenizer):
    deltas, decoder = _stream(tokenizer, "a\nb\nUse it", stop=["\nUser:"])
    assert not decoder.stopped
    assert "".join(deltas) == "a\nb\nUse it"


def test_truncate_at_stop_uses_earliest_stop():
    assert truncate_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert truncate_at_stop("one", ["x"]) == ("one", False)
    assert find_stop("abc", []) is None
