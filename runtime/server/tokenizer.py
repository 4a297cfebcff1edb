"""Text <-> token ids for the server, from the package's own tokenizer files.

Two implementations read the same `tokenizer.json`, so the server needs no `transformers`:
- `FastTokenizer`, Hugging Face's `tokenizers` library (what training tokenized with): the default.
  It holds 19 MiB against onnxruntime-genai's 33 MiB (library included) on a 49k vocabulary, and
  decodes the text after an invalid UTF-8 sequence or a NUL where onnxruntime-genai's decode stops;
- `PackageTokenizer`, onnxruntime-genai's, built from an `og.Config` alone (no model is loaded for
  it): used when export found the two encode differently (the manifest's `tokenizer` is "genai").
`open_tokenizer` picks by the manifest. The request layer uses the small `TextTokenizer` protocol,
so tests can substitute another.

Chat messages become a prompt through the base model's chat template, which the package carries
when the base had one (`chat_template.jinja`, as transformers 5 saves it, else the
`chat_template` of `tokenizer_config.json`). The template is read here and handed to
onnxruntime-genai's renderer explicitly, so which template applies never depends on where the
renderer looks (`FastTokenizer` makes that renderer at the first chat request).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. roles that do not alternate); says why."""


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class PackageTokenizer:
    """onnxruntime-genai's tokenizer of a package directory."""

    def __init__(self, package_dir: str | Path):
        import onnxruntime_genai as og

        self._tok = og.Tokenizer(og.Config(str(package_dir)))
        self.chat_template = read_chat_template(Path(package_dir))  # None: the base model has none

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if ids else ""

    def token_bytes(self, token: int) -> bytes:
        """One token's text as UTF-8 (a token that holds part of a character decodes as U+FFFD here)."""
        return self.decode([token]).encode("utf-8")

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """`messages` ({role, content}) rendered through the chat template, ending where the
        assistant's reply starts. Raises ChatTemplateError when the template refuses them."""
        if self.chat_template is None:
            raise ChatTemplateError("the package has no chat template")
        try:
            return self._tok.apply_chat_template(json.dumps(list(messages)), template_str=self.chat_template,
                                                 add_generation_prompt=True)
        except RuntimeError as exc:  # the template's raise_exception(...), or a template it cannot run
            raise ChatTemplateError(str(exc).split("\n", 1)[0]) from exc


class FastTokenizer:
    """Hugging Face `tokenizers` on the package's tokenizer.json; chat prompts through onnxruntime-genai's
    renderer, made at the first chat request."""

    def __init__(self, package_dir: str | Path):
        from tokenizers import Tokenizer

        self.root = Path(package_dir)
        self._tok = Tokenizer.from_file(str(self.root / TOKENIZER_FILE))
        # A tokenizer.json may carry training-time truncation or padding: a prompt is encoded whole
        # (its length is checked against the context by the server), as onnxruntime-genai encodes it.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.chat_template = read_chat_template(self.root)
        self._renderer: PackageTokenizer | None = None
        self._renderer_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""

    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes (which may be part of a UTF-8 character): a byte-level BPE token's
        symbols mapped back to bytes; other tokenizers' single-token decode."""
        from tokenizers import decoders

        piece = self._tok.id_to_token(token)
        if piece is not None and isinstance(self._tok.decoder, decoders.ByteLevel):
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.decode([token]).encode("utf-8")

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("the package has no chat template")
        with self._renderer_lock:
            if self._renderer is None:
                self._renderer = PackageTokenizer(self.root)
        return self._renderer.chat_prompt(messages)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable symbol that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[chr(byte)] = byte
        else:
            symbols[chr(256 + extra)] = byte
            extra += 1
    return symbols


def open_tokenizer(package_dir: str | Path, library: str | None) -> FastTokenizer | PackageTokenizer:
    """The package's tokenizer in the library its manifest names (None: `tokenizers`)."""
    return PackageTokenizer(package_dir) if library == "genai" else FastTokenizer(package_dir)


def read_chat_template(package_dir: Path) -> str | None:
    """The base model's chat template as the package carries it, or None."""
    jinja = package_dir / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    try:
        config = json.loads((package_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates (transformers): the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None
