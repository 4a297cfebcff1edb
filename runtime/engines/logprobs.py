"""Log-probabilities of chosen tokens, the same way in both engines.

`token_logprobs(scores, token, top)`: log_softmax of one row of scores (float64, so float32 logits
lose nothing), the token's value and the `top` most likely tokens (ties by id). The scores are the
ones the token was chosen from: the model's logits after the repetition penalty and the output
constraint's mask (forbidden tokens are -inf and never listed), before temperature, top-k and top-p.
"""

from __future__ import annotations

import numpy as np
from loraplex.runtime.engines.base import TokenLogprobs

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """log_softmax of `scores` [vocab] in float64 (-inf stays -inf)."""
    scores = np.asarray(scores, dtype=np.float64)
    peak = scores.max()
    shifted = scores - peak
    return shifted - np.log(np.exp(shifted).sum())


def token_logprobs(scores: np.ndarray, token: int, top: int, candidates: tuple[int, ...] = ()) -> TokenLogprobs:
    """`token`'s log-probability under `scores` [vocab] and the `top` most likely (token, logprob), or
    `candidates`' (in their order) when given."""
    logp = log_softmax(scores)
    alternatives: tuple[tuple[int, float], ...] = ()
    if candidates:
        alternatives = tuple((int(c), float(logp[c])) for c in candidates)
    elif top > 0:
        top = min(top, logp.size)
        ids = np.argpartition(-logp, top - 1)[:top]
        ids = ids[np.lexsort((ids, -logp[ids]))]
        alternatives = tuple((int(i), float(logp[i])) for i in ids if np.isfinite(logp[i]))
    return TokenLogprobs(float(logp[token]), alternatives)
