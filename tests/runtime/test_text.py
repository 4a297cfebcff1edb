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


@pytest.fixture(scope="module", params=["tokenizers", "genai"])
def package_tokenizer(request, recipe_package):
    from loraplex.runtime.server.tokenizer import open_tokenizer

    return open_tokenizer(recipe_package, request.param)


TEXTS = ["plain ascii", "héllo wörld", "snow ☃ and 😀 emoji", "日本語のテキスト", "mixed 🇫🇷 flags 👩‍👩‍👧"]


def test_the_package_says_which_library_tokenizes_and_both_agree_on_it(recipe_package):
    """The manifest says "tokenizers" (export writes it once it has checked that library against
    onnxruntime-genai's on the package's tokenizer; the recipe writes what export would); both encode
    alike, and decode ordinary tokens alike except where onnxruntime-genai's decode stops at an
    invalid UTF-8 sequence or a NUL (its text is then a prefix of ours). Special tokens decode to
    nothing (onnxruntime-genai gives U+FFFD for this tokenizer's)."""
    import random

    from loraplex.adapters.export.tokenizer_check import probe_texts
    from loraplex.adapters.package.manifest import Manifest
    from loraplex.runtime.server.tokenizer import FastTokenizer, PackageTokenizer, open_tokenizer

    assert Manifest.load(recipe_package).tokenizer == "tokenizers"
    assert isinstance(open_tokenizer(recipe_package, None), FastTokenizer)  # older manifests
    fast, genai = FastTokenizer(recipe_package), PackageTokenizer(recipe_package)
    for text in probe_texts(recipe_package / "tokenizer.json", random_texts=200, seed=1):
        assert fast.encode(text) == genai.encode(text), text
    special = set(fast._tok.get_added_tokens_decoder())
    assert special and all(fast.decode([i]) == "" for i in special)
    ordinary = [i for i in range(fast._tok.get_vocab_size()) if i not in special]
    rng, stopped = random.Random(0), 0
    for _ in range(300):
        ids = [rng.choice(ordinary) for _ in range(rng.randint(1, 12))]
        ours, theirs = fast.decode(ids), genai.decode(ids)
        assert ours == theirs or (ours.startswith(theirs) and theirs.endswith("\ufffd")), ids
        stopped += ours != theirs
    assert stopped  # the difference exists on this vocabulary: the assertion above is exercised


def test_text_after_an_invalid_utf8_sequence_is_not_lost(recipe_package):
    from loraplex.runtime.server.tokenizer import FastTokenizer

    tokenizer = FastTokenizer(recipe_package)
    broken = next(i for i in range(tokenizer._tok.get_vocab_size()) if tokenizer.decode([i]) == "\ufffd")
    detok = IncrementalDetokenizer(tokenizer)
    tokens = [broken, *tokenizer.encode(" plain words after it")]
    assert "".join([detok.push(t) for t in tokens] + [detok.flush()]) == "\ufffd plain words after it"


def test_chat_prompts_render_through_onnxruntime_genai_made_at_the_first_chat(recipe_package, tmp_path):
    import shutil

    from loraplex.runtime.server.tokenizer import FastTokenizer, PackageTokenizer

    from tests.fixtures.http import CHAT_TEMPLATE

    package = tmp_path / "package"
    shutil.copytree(recipe_package, package)
    (package / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    fast, genai = FastTokenizer(package), PackageTokenizer(package)
    assert fast._renderer is None
    messages = [{"role": "user", "content": "hi"}]
    assert fast.chat_prompt(messages) == genai.chat_prompt(messages)


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


def test_a_tokenizer_file_with_truncation_and_padding_still_encodes_a_prompt_whole(recipe_package, tmp_path):
    import json
    import shutil

    from loraplex.runtime.server.tokenizer import FastTokenizer

    package = tmp_path / "package"
    shutil.copytree(recipe_package, package)
    data = json.loads((package / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                       "pad_type_id": 0, "pad_token": "<|pad|>"}
    (package / "tokenizer.json").write_text(json.dumps(data))
    text = "a prompt much longer than four tokens, encoded whole and without padding"
    assert FastTokenizer(package).encode(text) == FastTokenizer(recipe_package).encode(text)
    assert len(FastTokenizer(recipe_package).encode(text)) > 4
