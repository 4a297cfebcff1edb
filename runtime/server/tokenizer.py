"""Text <-> token ids for the server, from the package's own tokenizer files.

onnxruntime-genai reads `tokenizer.json` itself, so the server needs no `transformers`; the
tokenizer is built from an `og.Config` alone (no model is loaded for it). The request layer
uses the small `TextTokenizer` protocol, so tests can substitute another.

Chat messages become a prompt through the base model's chat template, which the package carries
when the base had one (`chat_template.jinja`, as transformers 5 saves it, else the
`chat_template` of `tokenizer_config.json`). The template is read here and handed to
onnxruntime-genai's renderer explicitly, so which template applies never depends on where the
renderer looks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


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
