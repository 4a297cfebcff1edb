"""Text <-> token ids for the server, from the package's own tokenizer files.

onnxruntime-genai reads `tokenizer.json` itself, so the server needs no `transformers`; the
tokenizer is built from an `og.Config` alone (no model is loaded for it). The request layer
uses the small `TextTokenizer` protocol, so tests can substitute another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class PackageTokenizer:
    """onnxruntime-genai's tokenizer of a package directory."""

    def __init__(self, package_dir: str | Path):
        import onnxruntime_genai as og

        self._tok = og.Tokenizer(og.Config(str(package_dir)))

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if ids else ""
