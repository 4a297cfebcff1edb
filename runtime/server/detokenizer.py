"""Streaming text out of a token stream: UTF-8 safe pieces and stop strings.

Byte-level tokenizers split one character across tokens (an emoji is often 3-4 tokens); decoding
tokens one by one would emit U+FFFD. `IncrementalDetokenizer` decodes a short window and holds a
piece back until it no longer ends in an incomplete character. `StopMatcher` holds back text that
could be the start of a stop string, so a client never sees part of one. Both are engine-neutral
and run in the token sink, on the engine's thread, so a stop string ends generation before the
next step.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraplex.runtime.server.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feeds tokens, returns the new text each one completes (often "", never half a character)."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # window start: tokens before it are final text
        self._read = 0  # tokens up to here have been turned into text

    def push(self, token: int) -> str:
        self.tokens.append(token)
        window = self.tokens[self._prefix :]
        done = self._tok.decode(self.tokens[self._prefix : self._read])
        text = self._tok.decode(window)
        if len(text) <= len(done) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self._tok.decode(self.tokens[self._prefix : self._read])
        text = self._tok.decode(self.tokens[self._prefix :])
        self._prefix = self._read = len(self.tokens)
        return text[len(done) :]


class StopMatcher:
    """Releases text, holding back any tail that may begin a stop string; finds the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` released
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; returns what may be sent now. Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stops:
            return self._release(len(self.text))
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: release the held-back tail (it did not become a stop)."""
        return "" if self.stopped else self._release(len(self.text))

    def _held_back(self) -> int:
        longest = 0
        pending = len(self.text) - self.sent
        for stop in self.stops:
            for k in range(min(len(stop) - 1, pending), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece
