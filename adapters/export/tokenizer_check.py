"""Which library a package's server tokenizes with (the manifest's `tokenizer`).

The server prefers Hugging Face `tokenizers` (what training tokenized with; less memory than
onnxruntime-genai's tokenizer, see `runtime.server.tokenizer`). Export checks that it encodes the
package's `tokenizer.json` exactly as onnxruntime-genai does, on probe texts: fixed ones (spaces,
newlines, tabs, accents, CJK, emoji, digits, long runs), every added token of the tokenizer inside
text, and seeded random strings over a mixed alphabet. Any difference makes the package name
"genai", with a log line quoting the first text that differs.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

FIXED_PROBES = (
    "", " ", "hello world", " leading space", "trailing  ", "multi\n\nline\ttabs\r\n", "don't  stop", "123 456.78",
    "émoji 😀 and 中文 text, ÀÉÎõü ß Жж", "\u00a0no-break", "a" * 300, "Review: great!\nSentiment:",
    '{"name": "Ann", "n": [1, 2]}', "<html><b>x</b></html>",
)
ALPHABET = list("abcdefgh ijk\n\t.,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`0123456789ÀéüßЖж中文😀") + [" the", "ing", "  "]


def probe_texts(tokenizer_json: Path, random_texts: int = 400, seed: int = 0) -> list[str]:
    texts = list(FIXED_PROBES)
    try:
        added = [t["content"] for t in json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])]
    except (OSError, ValueError, TypeError, KeyError):
        added = []
    texts += [f"a{token}b {token}\n{token}" for token in added if isinstance(token, str)]
    rng = random.Random(seed)
    alphabet = ALPHABET + [t for t in added if isinstance(t, str)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(random_texts)]
    return texts


def choose_library(package_dir: Path) -> str:
    """"tokenizers" when it encodes every probe text as onnxruntime-genai does, else "genai"."""
    from loraplex.runtime.api import server_tokenizers

    fast, genai = server_tokenizers(package_dir)
    for text in probe_texts(package_dir / "tokenizer.json"):
        ours, theirs = fast.encode(text), genai.encode(text)
        if ours != theirs:
            log.warning("the tokenizers library encodes %r as %s, onnxruntime-genai as %s: the server will tokenize "
                        "with onnxruntime-genai", text[:60], ours[:12], theirs[:12])
            return "genai"
    return "tokenizers"
