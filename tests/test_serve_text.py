"""`TextStream`, the incremental detokenizer behind every streamed answer: multi-byte characters split across
byte-level tokens never show half-decoded, stop strings that span tokens end the text before them and are never
shown, and the shown deltas always add up to the final text."""
from __future__ import annotations

import pytest

from llm_trainer.serve.text import TextStream
from serve_models import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("text") / "tok")


def _stream(tok, text, **kw):
    s = TextStream(tok, **kw)
    deltas = []
    for t in tok.encode(text):
        d, stopped = s.push(t)
        deltas.append(d)
        if stopped:
            return s, deltas, True
    deltas.append(s.flush())
    return s, deltas, False


def test_split_characters_wait_until_complete(tok):
    text = "Ünïcödé — 東京 🙂 naïve café!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are pieces of a character
    s, deltas, stopped = _stream(tok, text)
    assert not stopped and "".join(deltas) == s.text == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop,expected", [
    (["own f"], "The quick br"), (["zzz", "lazy"], "The quick brown fox jumps over the "),
    (["The"], ""), (["dog."], "The quick brown fox jumps over the lazy "), (["absent"], None)])
def test_stop_strings(tok, stop, expected):
    text = "The quick brown fox jumps over the lazy dog."
    s, deltas, stopped = _stream(tok, text, stop=stop)
    assert stopped == (expected is not None)
    assert "".join(deltas) == s.text == (text if expected is None else expected)
    shown = ""
    for d in deltas:  # nothing of the stop string was ever shown, at any point
        shown += d
        assert text.startswith(shown) and (expected is None or len(shown) <= len(expected))
    if stopped:
        assert s.push(tok.encode("x")[0]) == ("", True)  # nothing more after a stop


def test_leading_space_and_special_tokens(tok):
    s, deltas, _ = _stream(tok, " Hello there", strip_leading_space=True)
    assert s.text == "Hello there" and "".join(deltas) == "Hello there"
    s = TextStream(tok)
    out = [s.push(t)[0] for t in tok.encode("Hi<|im_end|>")]
    assert "".join(out) + s.flush() == "Hi"  # the end-of-turn token is not shown


def test_incomplete_character_at_the_end_is_flushed(tok):
    ids = tok.encode("東")
    s = TextStream(tok)
    assert [s.push(t)[0] for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert s.flush() == tok.decode(ids[:-1])  # shown as the decoder shows it (a replacement character)
