"""Per-row token choice for the batched engine: each row has its own sampling parameters.

Greedy rows (temperature 0 or top_k 1) take the first maximum, as onnxruntime-genai's greedy
search does, so greedy output equals the `genai` engine's token for token. Sampled rows draw
from their own seeded generator: the same seed, prompt and adapter give the same output
whatever else shares the batch. A row with an output constraint (`RowConstraint`) has every token
the constraint forbids set to -inf before its choice, greedy or sampled, and the constraint then
advances with the chosen token; rows without one are untouched. A row whose logits are not finite
(a corrupt adapter, an extreme penalty) gets an error instead of a token; the other rows of the step are unaffected.
A row that asked for log-probabilities gets them from the scores its token was chosen from (`take`);
a scoring row (`params.forced`) takes its given tokens in order instead of choosing.
"""

from __future__ import annotations

import math

import numpy as np
from loraplex.runtime.engines.base import SamplingParams, TokenLogprobs
from loraplex.runtime.engines.guidance import RowConstraint
from loraplex.runtime.engines.logprobs import token_logprobs
from loraplex.runtime.errors import EngineFailure


class NonFiniteLogits(EngineFailure):
    """The model produced NaN or infinite scores for one request."""

    def __init__(self) -> None:
        super().__init__("the model produced non-finite scores for this request (check the adapter's weights)")


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature <= 0.0 or params.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """onnxruntime-genai's rule over every token of the sequence (prompt included): a positive
    score is divided by the penalty, a negative one multiplied. Returns a new array."""
    out = logits.copy()
    scores = out[seen]
    out[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def distribution(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The sampled distribution of `logits` [vocab] after temperature, then top-k, then top-p: the
    candidate ids (by score, ties by id) and their probabilities (summing to 1)."""
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k > 0 and params.top_k < scaled.size:
        candidates = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
    else:
        candidates = np.arange(scaled.size)
    # Sort candidates by score (ties by id) so the draw does not depend on partition order.
    order = np.lexsort((candidates, -scaled[candidates]))
    candidates = candidates[order]
    probs = np.exp(scaled[candidates] - scaled[candidates[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        candidates, probs = candidates[:keep], probs[:keep]
        probs = probs / probs.sum()
    return candidates, probs


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Draw one token from `logits` [vocab] with temperature, then top-k, then top-p."""
    candidates, probs = distribution(logits, params)
    return int(candidates[rng.choice(candidates.size, p=probs)])


class RowSampler:
    """The sampling state of one running request: its params, RNG and the tokens seen so far."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 constraint: RowConstraint | None = None):
        self.params = params
        self.constraint = constraint
        self.greedy = is_greedy(params)
        self.rng = np.random.default_rng(params.seed)
        self.penalize = params.repetition_penalty != 1.0
        self.seen = np.zeros(vocab_size, dtype=bool)
        if self.penalize:
            self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self.forced = params.forced  # a scoring row's tokens, taken in order
        self.taken = 0
        self.logprobs: TokenLogprobs | None = None  # of the last token taken, when the row asked for them

    @property
    def plain(self) -> bool:
        """Greedy with nothing to apply or record: served by the batch's vectorized argmax."""
        return (self.greedy and not self.penalize and self.constraint is None and self.params.logprobs is None
                and not self.forced)

    def choose(self, logits: np.ndarray) -> int:
        """The row's next token from its `logits` [vocab]; the row's state advances with it."""
        scores = self.process(logits)
        if self.forced:
            token = self.forced[min(self.taken, len(self.forced) - 1)]
        else:
            token = int(np.argmax(scores)) if self.greedy else sample_token(scores, self.params, self.rng)
        return self.take(scores, token)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """The row's scores for its next token: `logits` [vocab] with the repetition penalty over the
        tokens seen so far, then the constraint's mask. Raises NonFiniteLogits for a broken row (greedy
        unconstrained rows: checked on the chosen score only, by `take`)."""
        if self.penalize:
            logits = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        if self.constraint is not None:
            if not np.isfinite(logits).all():  # before masking: the mask's -inf are not the model's fault
                raise NonFiniteLogits()
            logits = self.constraint.mask(logits)
            if not np.isfinite(logits.max()):
                raise EngineFailure("the output constraint allows no token here")
        elif not self.greedy and not np.isfinite(logits).all():
            raise NonFiniteLogits()
        return logits

    def take(self, scores: np.ndarray, token: int) -> int:
        """Record `token` as the row's next one (the constraint advances, the penalty sees it)."""
        if not math.isfinite(float(scores[token])):
            if self.constraint is not None:
                raise EngineFailure("the output constraint allows no token here")
            raise NonFiniteLogits()
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.penalize:
            self.seen[token] = True
        if self.params.logprobs is not None:
            self.logprobs = token_logprobs(scores, token, self.params.logprobs, self.params.candidates)
        self.taken += 1
        return token


def choose_tokens(logits: np.ndarray, samplers: list[RowSampler]) -> list[int | Exception]:
    """One token (or the row's error) per row of `logits` [rows, vocab]; plain greedy rows share one
    vectorized argmax (argmax returns a NaN's or an inf's position, so checking the chosen score
    finds a broken row without scanning the vocabulary)."""
    plain = [i for i, s in enumerate(samplers) if s.plain]
    tokens: list[int | Exception] = [0] * len(samplers)
    if plain:
        best = np.argmax(logits[plain], axis=-1)
        scores = logits[plain, best]
        for i, t, score in zip(plain, best.tolist(), scores.tolist(), strict=True):
            tokens[i] = t if math.isfinite(score) else NonFiniteLogits()
    if len(plain) != len(samplers):
        plain_set = set(plain)
        for i, sampler in enumerate(samplers):
            if i in plain_set:
                continue
            try:
                tokens[i] = sampler.choose(logits[i])
            except Exception as exc:  # this row's own failure: it ends this row, never the step
                tokens[i] = exc
    return tokens
