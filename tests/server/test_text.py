"""Streamed text: released only once it cannot change; stop strings end it (and are not returned)."""

from __future__ import annotations

import pytest

from ds4c.errors import InputError
from ds4c.runtime.tokenizer import Tokenizer
from ds4c.server.text import TextStream

BYTES = Tokenizer("bytes", vocab_size=512)


def _feed(stream: TextStream, text: bytes, final_at: int | None = None) -> list[str]:
    ids = list(text)
    return [stream.add([t], i == len(ids) - 1 if final_at is None else i == final_at) for i, t in enumerate(ids)]


def test_multibyte_characters_are_released_whole():
    out = _feed(TextStream(BYTES, []), "aé€b".encode())
    assert "".join(out) == "aé€b"
    assert all("\ufffd" not in piece for piece in out)


def test_stop_string_ends_the_text_before_it_even_across_tokens():
    s = TextStream(BYTES, ["END"])
    out = _feed(s, b"hello ENDworld")
    assert "".join(out) == "hello " and s.stopped
    assert s.add([ord("x")], False) == ""  # nothing after a stop
    # a partial match is held back, then released when it turns out not to be one
    s = TextStream(BYTES, ["END"])
    out = _feed(s, b"an ENd")
    assert "".join(out) == "an ENd" and not s.stopped


def test_earliest_of_several_stop_strings_wins():
    s = TextStream(BYTES, ["bb", "a"])
    assert "".join(_feed(s, b"xxbba")) == "xx" and s.stopped


def test_no_tokenizer_no_text():
    assert TextStream(Tokenizer("none", vocab_size=100), ["x"]).add([1, 2], True) == ""


def test_chat_template_is_sandboxed():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    impl = HFTokenizer(WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer("hf", impl, 2, evil)
    with pytest.raises(InputError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(InputError, match="no chat template"):
        Tokenizer("hf", impl, 2).apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_missing_chat_template_member_is_refused_by_name():
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    from ds4c.errors import ArtifactError
    from ds4c.runtime.tokenizer import tokenizer_for

    blob = HFTokenizer(WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).to_str().encode()
    members = {"tokenizer/tokenizer.json": blob, "tokenizer/bad.jinja": b"\xff\xfe"}
    container = SimpleNamespace(read_bytes=members.get)
    for member in ("tokenizer/absent.jinja", "tokenizer/bad.jinja"):
        info = {"kind": "hf", "member": "tokenizer/tokenizer.json", "chat_template": member}
        model = SimpleNamespace(manifest={"tokenizer": info}, container=container, vocab_size=2)
        with pytest.raises(ArtifactError, match=member):
            tokenizer_for(model)
