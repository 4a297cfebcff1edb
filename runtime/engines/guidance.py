"""Output constraints at decode time, with llguidance (the library behind onnxruntime-genai's guidance).

- `check_constraint`: compiles a constraint without a tokenizer and raises InvalidRequest naming the
  field and the fault (request time; export checks a task's declared contract the same way);
- `Guidance`: one package's tokenizer as llguidance sees it (built from its `tokenizer.json`), which
  makes a `RowConstraint` per constrained request of the batched engine;
- `RowConstraint`: a matcher that gives the allowed tokens before each step (a mask applied to the
  logits before sampling, greedy or sampled) and advances with each accepted token; `complete` once
  the constraint allows nothing more than ending.

The genai engine hands the same `OutputConstraint.guidance()` form to onnxruntime-genai, so both
engines enforce the same language.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from loraplex.adapters.package.output import OutputConstraint
from loraplex.runtime.errors import EngineFailure, InvalidRequest

if TYPE_CHECKING:
    import llguidance as llg

MAX_MESSAGE = 300  # characters of a compiler message quoted back


def _llg():
    """llguidance, imported at the first constraint (a server that never sees one does not load it)."""
    import llguidance

    return llguidance


def grammar_of(constraint: OutputConstraint) -> str:
    """The llguidance grammar of a constraint (not checked: see `check_constraint`)."""
    kind, data = constraint.guidance()
    llg = _llg()
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(data)
    if kind == "lark_grammar":
        return llg.LLMatcher.grammar_from_lark(data)
    try:
        return llg.LLMatcher.grammar_from_json_schema(data)
    except ValueError as exc:
        raise InvalidRequest(f"the JSON schema is not a JSON object: {exc}") from None


def check_constraint(constraint: OutputConstraint, field: str) -> OutputConstraint:
    """The constraint if it compiles; else InvalidRequest naming `field` and the compiler's message."""
    error = _llg().LLMatcher.validate_grammar(grammar_of(constraint))
    if error:
        message = " ".join(error.split())[:MAX_MESSAGE]
        raise InvalidRequest(f"{field} is not a valid {constraint.kind}: {message}", field=field)
    return constraint


class Guidance:
    """llguidance's view of one package's tokenizer; makes the per-request matchers."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: Iterable[int]):
        eos = sorted(set(eos_ids))
        self.vocab_size = vocab_size
        # No "slices" (llguidance's precomputed token subsets that speed up masks): on a 49k vocabulary
        # they hold 14 MiB (33 vs 19 MiB) and save ~0.06 ms per mask (0.03 vs 0.1 ms for a JSON schema's
        # strings), nothing against a decode step's milliseconds. Masks are the same either way.
        self.tokenizer = _llg().LLTokenizer(Path(tokenizer_json).read_text(encoding="utf-8"), n_vocab=vocab_size,
                                         eos_token=eos or None, slices=[])

    def row(self, constraint: OutputConstraint) -> RowConstraint:
        matcher = _llg().LLMatcher(self.tokenizer, grammar_of(constraint))
        if matcher.is_error():  # checked at request time: a bug or an llguidance limit
            raise EngineFailure(f"the output constraint did not compile: {matcher.get_error()[:MAX_MESSAGE]}")
        return RowConstraint(matcher, self.vocab_size, self.tokenizer)


class RowConstraint:
    """One request's constraint state in the batched engine."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, tokenizer: llg.LLTokenizer | None = None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer  # tokenizes the bytes the constraint forces (speculative drafts)
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._next: np.ndarray | None = None  # `prepare`d mask for the next token

    def allowed(self) -> np.ndarray:
        """A bool [vocab] of the tokens the constraint allows next (EOS where it may end)."""
        if self._next is not None:
            return self._next
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)  # drops the GIL
        self._next = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        return self._next

    def prepare(self) -> None:
        """Compute the next mask now (another thread, while the model runs); never raises: a failure
        is raised again by `mask` on the engine thread, as this row's own error."""
        try:
            self.allowed()
        except Exception:
            self._next = None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [vocab] with every token the constraint forbids at -inf (a new array)."""
        return np.where(self.allowed(), logits, -np.inf).astype(logits.dtype, copy=False)

    def advance(self, token: int) -> None:
        self._next = None
        if not self.matcher.consume_token(token):
            raise EngineFailure(f"the output constraint refused token {token}: {self.matcher.get_error()[:200]}")

    @property
    def complete(self) -> bool:
        """Nothing more may follow (the constraint is satisfied and closed, or EOS was taken)."""
        return self.matcher.is_stopped()
