"""Streaming detokenization (UTF-8 safe), stop strings and request validation, without a server."""

from __future__ import annotations

import pytest
from loraplex.runtime.errors import InvalidRequest
from loraplex.runtime.server.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.runtime.server.validation import sampling_params


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for streaming (every non-ASCII character splits)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


@pytest.fixture(scope="module")
def package_tokenizer(tiny_package):
    from loraplex.runtime.server.tokenizer import PackageTokenizer

    return PackageTokenizer(tiny_package)


TEXTS = ["plain ascii", "héllo wörld", "snow ☃ and 😀 emoji", "日本語のテキスト", "mixed 🇫🇷 flags 👩‍👩‍👧"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_never_split_a_character_and_add_up_to_the_text(text, package_tokenizer):
    for tokenizer in (ByteTokenizer(), package_tokenizer):
        detok = IncrementalDetokenizer(tokenizer)
        pieces = [detok.push(t) for t in tokenizer.encode(text)] + [detok.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_byte_tokens_hold_back_until_the_character_completes():
    detok = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detok.push(b) for b in "a😀".encode()]
    assert pieces == ["a", "", "", "", "😀"]


def test_incomplete_character_at_the_end_flushes_as_a_replacement():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert [detok.push(b) for b in "😀".encode()[:2]] == ["", ""]
    assert detok.flush() == "\ufffd"


def test_stop_string_across_pieces_is_cut_and_never_sent():
    matcher = StopMatcher(["END"])
    sent = [matcher.feed(p) for p in ["ab", "cE", "N", "xE", "ND tail"]]
    assert sent == ["ab", "c", "", "ENx", ""]
    assert matcher.stopped and "".join(sent) == "abcENx"


def test_held_back_prefix_is_released_when_generation_ends():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("done\n") == "done"
    assert matcher.flush() == "\n"


def test_first_of_several_stop_strings_wins():
    matcher = StopMatcher(["zz", "b"])
    assert matcher.feed("aabzz") == "aa" and matcher.stopped


def test_zero_values_mean_defaults():
    params = sampling_params(context_length=512)
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (64, 0.0, 1.0, 0)
    assert params.repetition_penalty == 1.0 and params.seed is None and params.stop == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_new_tokens": 513}, "max_new_tokens"), ({"top_p": -0.1}, "top_p"), ({"stop": ["x"] * 17}, "stop"),
     ({"temperature": float("inf")}, "temperature"), ({"stop": ["x" * 300]}, "stop[0]")],
)
def test_invalid_values_name_their_field(kwargs, field):
    with pytest.raises(InvalidRequest, match=rf"params\.{field.replace('[', '.').replace(']', '.')}"):
        sampling_params(context_length=512, **kwargs)
