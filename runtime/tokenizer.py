"""Text <-> token ids for the server, from the package's own tokenizer files.

onnxruntime-genai reads `tokenizer.json` itself, so the server needs no `transformers`. Both
engines and the request layer use the small `TextTokenizer` protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class TextTokenizer(Protocol):
    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class GenaiTokenizer:
    """onnxruntime-genai's tokenizer behind `TextTokenizer`."""

    def __init__(self, og_tokenizer: Any, eos_token_ids: list[int]):
        self._tok = og_tokenizer
        self.eos_token_ids = list(eos_token_ids)

    @classmethod
    def from_model(cls, og_model: Any) -> GenaiTokenizer:
        import onnxruntime_genai as og

        tok = og.Tokenizer(og_model)
        return cls(tok, [int(i) for i in tok.eos_token_ids])

    @classmethod
    def from_package(cls, package_dir: str | Path) -> GenaiTokenizer:
        """Loads the package's model through onnxruntime-genai just for its tokenizer (CPU)."""
        import onnxruntime_genai as og

        config = og.Config(str(package_dir))
        config.clear_providers()
        return cls.from_model(og.Model(config))

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if ids else ""
