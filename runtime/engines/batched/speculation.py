"""Speculative decoding without a draft model: proposals, per-row draft lengths, verification.

A decode step may feed a row its next token plus `k` proposed ("draft") tokens; the graph returns
the row's logits at each of the `k + 1` positions, and verification keeps the drafts the model
agrees with plus one token of the model's own, so one step yields 1 to `k + 1` tokens. Drafts come
from the row itself, never from a second model:

- prompt lookup (`PromptLookup`): the row's last n tokens are looked up in its prompt and output
  (longest n first, latest occurrence), and the tokens that followed there are proposed, the
  technique of "prompt lookup decoding" (copy-heavy tasks: extraction, rewriting, correction);
- the output contract (`contract_drafts`): the tokens an llguidance constraint forces next
  (its fast-forward tokens, e.g. a JSON schema's keys and punctuation).

Verification (`verify_run`, `choose_runs`) chooses the row's token at each position with its own
`RowSampler`, exactly as plain decoding would (penalties and the constraint's mask apply per
position: position j sees drafts 0..j-1 as seen, and the constraint advances only with accepted
tokens), and keeps going while the chosen token equals the draft. Greedy rows thus accept the
longest prefix of drafts equal to their argmax, then take the argmax at the first mismatch: their
output equals plain greedy decoding. Sampled rows draw each token from their processed
distribution p and accept the draft d iff the draw is d: d is accepted with probability p(d), and
on rejection the token follows p without d, renormalised, which is the speculative sampling rule
for a point-mass draft (so the output keeps its distribution). Drawn this way, a sampled row
consumes its seeded generator exactly as plain decoding does: the same seed gives the same tokens
with speculation on or off, whatever the drafts, as long as the logits are the same. (onnxruntime
computes a multi-token step's logits slightly otherwise than a one-token step's, as for a
prefill: ~3e-5 in fp32, up to ~0.4 on an int4 model, where near-ties can then differ.)

`DraftBudget` adapts each row's draft length: it grows while drafts are accepted, shrinks on
rejections, and stops drafting for a while (longer each time) after drafts that were all
rejected, so a task that copies nothing pays almost nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from loraplex.runtime.engines.base import SPECULATION_MODES, SamplingParams
from loraplex.runtime.engines.batched.sampling import NonFiniteLogits, RowSampler
from loraplex.runtime.engines.guidance import RowConstraint

if TYPE_CHECKING:
    from loraplex.runtime.engines.batched.scheduler import Row

log = logging.getLogger(__name__)

MODES = SPECULATION_MODES
MAX_DRAFT = 6  # drafts per row and step (the verification feeds up to this many more tokens)
MAX_NGRAM = 3
MIN_NGRAM = 2  # a single matching token proposes too often, and too often wrongly
RATE_DECAY = 0.9  # weight of a row's older drafts in its acceptance estimate, per step


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"speculation must be one of {', '.join(MODES)} (got {mode!r})")
    return mode


EXACT_PRECISIONS = ("fp32",)  # where verified drafts were token-exact on every test and bench request


def resolve_mode(mode: str, precision: str) -> str:
    """The mode a package runs with: "auto" drafts only where verifying drafts keeps greedy output
    token-exact (`EXACT_PRECISIONS`). A quantized package's multi-token steps round otherwise than its
    one-token steps (up to ~0.4 in the logits on SmolLM2-135M int4), so a near-tie could break the
    other way than without speculation, and, since drafting follows measured step times, differently
    from run to run: there "auto" is off, and `on` / `lookup` / `contract` turn drafting on knowingly."""
    if check_mode(mode) == "auto" and precision not in EXACT_PRECISIONS:
        log.info("speculation auto is off on this %s package: a multi-token step rounds otherwise than a "
                 "one-token step, so drafts could change greedy output at near-ties (--speculation on turns "
                 "drafting on)", precision)
        return "off"
    return mode


class PromptLookup:
    """An n-gram index over a row's tokens (its prompt, then its output as it grows).

    For every n-gram (MIN_NGRAM <= n <= MAX_NGRAM) it keeps where the tokens after its latest
    occurrence start; the current suffix is indexed only once a token follows it, so a lookup never
    finds the suffix itself."""

    def __init__(self, tokens: Iterable[int] = (), *, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram (got {min_ngram}, {max_ngram})")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> start of what followed its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        seq, index = self.tokens, self._next
        for token in tokens:
            end = len(seq)  # the n-grams ending just before `token` are followed by it
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                index[tuple(seq[end - n:end])] = end
            seq.append(int(token))

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        seq = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            start = self._next.get(tuple(seq[len(seq) - n:]))
            if start is not None:
                return seq[start:start + k]
        return []


def contract_drafts(constraint: RowConstraint, k: int) -> list[int]:
    """Up to `k` tokens for the text the constraint forces next. llguidance's fast-forward tokens stop
    where the forced text's last token could merge with what follows (`"name":"` gives `{"`, `name`
    but not `":"`); a draft need not be certain, only likely, so the forced bytes' own tokens, as
    far as the constraint accepts them, are proposed when they reach further."""
    if k <= 0 or constraint.complete:
        return []
    matcher = constraint.matcher
    drafts = list(matcher.compute_ff_tokens())
    if constraint.tokenizer is not None:
        forced = matcher.compute_ff_bytes()
        if forced:
            tokens = list(constraint.tokenizer.tokenize_bytes(forced))
            tokens = tokens[: matcher.validate_tokens(tokens)]
            if len(tokens) > len(drafts):
                drafts = tokens
    return drafts[:k]


def allowed_prefix(constraint: RowConstraint, drafts: list[int]) -> list[int]:
    """The drafts the constraint accepts in a row (a draft it forbids would be rejected anyway)."""
    if not drafts:
        return drafts
    return drafts[: constraint.matcher.validate_tokens(drafts)]


@dataclass
class DraftBudget:
    """One row's draft length for one source of drafts.

    `length` grows by half (at least one) when every draft of a step is accepted, becomes one more
    than the accepted count on a partial acceptance, and halves when none is accepted; after
    `patience` such misses in a row the source rests for `rest` steps, doubled at each rest (up to
    `max_rest`) until drafts are accepted again."""

    max_length: int = MAX_DRAFT
    length: int = 2
    patience: int = 2
    rest: int = 4
    max_rest: int = 256
    misses: int = 0
    resting: int = 0
    hits: float = 1.0  # recent accepted drafts (decayed), with a prior of one
    stops: float = 1.0  # recent rejections (decayed), with a prior of one
    _next_rest: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.length = min(self.length, self.max_length)
        self._next_rest = self.rest

    def take(self) -> int:
        """The draft length for this step (0 while resting; counts the step)."""
        if self.resting:
            self.resting -= 1
            return 0
        return self.length

    @property
    def rate(self) -> float:
        """The estimated chance that the next draft is accepted (drafts as independent trials: the
        accepted ones are successes, a rejection ends the trials)."""
        return self.hits / (self.hits + self.stops)

    def record(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.hits = RATE_DECAY * self.hits + accepted
        self.stops = RATE_DECAY * self.stops + (accepted < drafted)
        if accepted >= drafted:
            self.length = min(self.max_length, drafted + max(1, drafted // 2))
            self.misses, self._next_rest = 0, self.rest
        elif accepted > 0:
            self.length = min(self.max_length, accepted + 1)
            self.misses, self._next_rest = 0, self.rest
        else:
            self.length = max(1, self.length // 2)
            self.misses += 1
            if self.misses >= self.patience:
                self.resting, self.misses = self._next_rest, 0
                self._next_rest = min(self.max_rest, self._next_rest * 2)


def drafter_for(mode: str, params: SamplingParams, prompt_ids: Sequence[int],
                constraint: RowConstraint | None) -> RowDrafter | None:
    """The drafter of a new row, or None when it never drafts: speculation is off, the row scores
    given tokens, or `mode` has no source for it (contract drafting for a row without a constraint)."""
    if mode == "off" or params.forced:
        return None
    drafter = RowDrafter(mode, prompt_ids, constraint)
    return drafter if drafter.active else None


class RowDrafter:
    """The drafts of one running request: its lookup index, its sources' budgets, its counts."""

    def __init__(self, mode: str, prompt_ids: Sequence[int], constraint: RowConstraint | None,
                 max_draft: int = MAX_DRAFT):
        check_mode(mode)
        self.constraint = constraint
        self.lookup = PromptLookup(prompt_ids) if mode in ("lookup", "on", "auto") else None
        self.contract = constraint is not None and mode in ("contract", "on", "auto")
        self.lookup_budget = DraftBudget(max_draft)
        self.contract_budget = DraftBudget(max_draft, length=max_draft, hits=4.0)  # forced tokens: mostly right
        self.drafted = 0  # drafts verified so far
        self.accepted = 0  # of which accepted
        self._source: DraftBudget | None = None  # the budget this step's drafts came from

    @property
    def active(self) -> bool:
        return self.lookup is not None or self.contract

    @property
    def rate(self) -> float:
        """The acceptance estimate of the source of this step's drafts (0 without drafts)."""
        return self._source.rate if self._source is not None else 0.0

    def propose(self, room: int) -> list[int]:
        """This step's drafts, at most `room` (what the row may still produce after one token)."""
        self._source = None
        if room <= 0:
            return []
        if self.contract:
            assert self.constraint is not None
            drafts = contract_drafts(self.constraint, min(room, self.contract_budget.take()))
            if drafts:
                self._source = self.contract_budget
                return drafts
        if self.lookup is not None:
            drafts = self.lookup.propose(min(room, self.lookup_budget.take()))
            if drafts and self.constraint is not None:
                drafts = allowed_prefix(self.constraint, drafts)
            if drafts:
                self._source = self.lookup_budget
                return drafts
        return []

    def record(self, drafts: Sequence[int], run: Sequence[int]) -> None:
        """The step's outcome: `run` is the tokens it yielded (accepted drafts, then the model's)."""
        if drafts:
            accepted = accepted_count(drafts, run)
            self.drafted += len(drafts)
            self.accepted += accepted
            if self._source is not None:
                self._source.record(len(drafts), accepted)
        self._source = None
        if self.lookup is not None:
            self.lookup.extend(run)


def accepted_count(drafts: Sequence[int], run: Sequence[int]) -> int:
    """How many drafts `run` kept: its leading tokens equal to the drafts (the model's own token after
    them never equals the draft it replaces)."""
    n = 0
    for draft, token in zip(drafts, run, strict=False):
        if draft != token:
            break
        n += 1
    return n


class Run(list):
    """A row's tokens from one step and, when the row asked for them, each token's log-probabilities
    (`logprobs[i]` of token i, from the scores it was chosen from)."""

    def __init__(self, tokens: Iterable[int] = ()):
        super().__init__(tokens)
        self.logprobs: list = []


def verify_run(logits: np.ndarray, sampler: RowSampler, drafts: Sequence[int],
               stop_ids: Collection[int] = ()) -> Run:
    """The tokens one row yields from its logits at positions 0..len(drafts) ([k + 1, vocab]): the
    drafts accepted in order, then the model's own token at the first rejection (or after the last
    draft). The run also ends early at a token in `stop_ids` (EOS) or one that completes the row's
    constraint: nothing after it could be output. Raises the row's own error (non-finite scores)."""
    run = Run()
    for j in range(len(drafts) + 1):
        token = sampler.choose(logits[j])
        run.append(token)
        if sampler.params.logprobs is not None:
            run.logprobs.append(sampler.logprobs)
        if j == len(drafts) or token != drafts[j] or token in stop_ids:
            break
        if sampler.constraint is not None and sampler.constraint.complete:
            break
    return run


def choose_runs(logits: np.ndarray, samplers: list[RowSampler], drafts: list[list[int]],
                stop_ids: Collection[int] = ()) -> list[list[int] | Exception]:
    """A run of tokens (or the row's error) per row of `logits` [rows, positions, vocab], row i
    verifying `drafts[i]` (logits at positions 0..len(drafts[i])). Plain greedy rows (no penalty, no
    constraint) share one vectorized argmax over every position. `stop_ids`: EOS (see `verify_run`;
    a row that ignores EOS without a constraint continues past it)."""
    runs: list[list[int] | Exception] = [[] for _ in samplers]
    plain = [i for i, s in enumerate(samplers) if s.plain]
    if plain:
        width = 1 + max(len(drafts[i]) for i in plain)
        best = np.argmax(logits[plain, :width], axis=-1)  # [plain rows, width]
        scores = np.take_along_axis(logits[plain, :width], best[..., None], axis=-1)[..., 0]
        for i, tokens, row_scores in zip(plain, best.tolist(), scores.tolist(), strict=True):
            runs[i] = _greedy_run(drafts[i], tokens, row_scores, stops_of(samplers[i], stop_ids))
    plain_set = set(plain)
    for i, sampler in enumerate(samplers):
        if i in plain_set:
            continue
        try:
            runs[i] = verify_run(logits[i], sampler, drafts[i], stops_of(sampler, stop_ids))
        except Exception as exc:  # this row's own failure: it ends this row, never the step
            runs[i] = exc
    return runs


def stops_of(sampler: RowSampler, eos_ids: Collection[int]) -> Collection[int]:
    """The tokens that end a row's run: EOS, unless the row ignores it (and has no constraint)."""
    return () if sampler.params.ignore_eos and sampler.constraint is None else eos_ids


def _greedy_run(drafts: Sequence[int], tokens: list[int], scores: list[float],
                stop_ids: Collection[int]) -> list[int] | Exception:
    run: list[int] = []
    for j, token in enumerate(tokens[: len(drafts) + 1]):
        if not math.isfinite(scores[j]):
            return NonFiniteLogits()
        run.append(token)
        if j == len(drafts) or token != drafts[j] or token in stop_ids:
            break
    return run


def expected_run(rate: float, drafts: int) -> float:
    """Tokens a step yields on average with `drafts` drafts each accepted with chance `rate` (in
    order, up to the first rejection), the model's own token included."""
    if drafts <= 0:
        return 1.0
    if rate >= 1.0:
        return drafts + 1.0
    return (1.0 - rate ** (drafts + 1)) / (1.0 - rate)


PRIOR_WEIGHT = 0.01  # of each of the cost model's two prior steps, against ~50 measured ones


class DraftGate:
    """Measured tokens per second of decode steps with drafts and without, per batch size: drafts go
    on while steps with them measure faster, and the losing side is tried again every
    `explore_every` steps, so the choice follows the machine's load and the task. It catches what
    the cost model's two numbers miss (a batch's rows are not a row's positions to the kernels)."""

    def __init__(self, explore_every: int = 16, min_samples: int = 3, weight: float = 0.2):
        self.explore_every, self.min_samples, self.weight = explore_every, min_samples, weight
        self.rates: dict[tuple[int, bool], float] = {}  # (batch bucket, drafted) -> tokens/s (moving average)
        self.samples: dict[tuple[int, bool], int] = {}
        self._asked = 0

    @staticmethod
    def bucket(rows: int) -> int:
        return rows if rows <= 2 else 1 << (rows - 1).bit_length()

    def allows(self, rows: int) -> bool:
        bucket = self.bucket(rows)
        if self.samples.get((bucket, True), 0) < self.min_samples:
            return True
        if self.samples.get((bucket, False), 0) < self.min_samples:
            return False
        self._asked += 1
        better = self.rates[(bucket, True)] >= self.rates[(bucket, False)]
        return (not better) if self._asked % self.explore_every == 0 else better

    def observe(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        key, rate = (self.bucket(rows), drafted), tokens / seconds
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (1 - self.weight) * old + self.weight * rate
        self.samples[key] = self.samples.get(key, 0) + 1


class StepCost:
    """What a decode step costs and which rows' drafts pay for themselves.

    A step is one or more session runs; its time is modelled as `per_run` per run (reading every
    weight once, fixed overheads) plus `per_token` per token fed, fitted by least squares over recent
    single-row steps (older ones weigh less; a row's drafts make the token count vary) with a weak
    prior (`per_run` = 6 `per_token`, as measured on a small model on two cores), so the model
    follows the machine and the model it serves. In a batch, `DraftGate` decides besides. Rows that
    verify drafts run alone (GroupQueryAttention's CPU kernel takes several new tokens after a past
    for one row only), rows without drafts share runs with their neighbours: `plan` keeps the drafts
    that raise the step's expected tokens per second, and only as many of each row's as are worth
    their cost, when `DraftGate` measures that steps with drafts are faster at this batch size."""

    def __init__(self, per_run: float = 6e-3, per_token: float = 1e-3, decay: float = 0.98):
        self.decay = decay
        self.gate = DraftGate()
        self._gram = np.zeros((2, 2))
        self._rhs = np.zeros(2)
        self._prior = [(1.0, 1.0, per_run + per_token), (1.0, 9.0, per_run + 9 * per_token)]
        self.per_run, self.per_token = per_run, per_token

    def observe(self, runs: int, tokens: int, seconds: float) -> None:
        x = np.array([runs, tokens], dtype=np.float64)
        self._gram = self.decay * self._gram + np.outer(x, x)
        self._rhs = self.decay * self._rhs + x * seconds
        gram, rhs = self._gram.copy(), self._rhs.copy()
        for r, t, y in self._prior:  # never decayed, so the fit is never singular; weak, so data win
            p = np.array([r, t])
            gram += PRIOR_WEIGHT * np.outer(p, p)
            rhs += PRIOR_WEIGHT * p * y
        per_run, per_token = np.linalg.solve(gram, rhs)
        self.per_token = max(float(per_token), 1e-6)
        self.per_run = max(float(per_run), 1e-6)

    def time(self, runs: int, tokens: int) -> float:
        return self.per_run * runs + self.per_token * tokens

    def plan(self, proposals: Sequence[tuple[int, float]]) -> list[int]:
        """How many drafts each row verifies (0: none) given its proposal (draft count, acceptance
        estimate), rows in KV order."""
        n = len(proposals)
        keep = [0] * n
        if not any(k for k, _ in proposals) or (n > 1 and not self.gate.allows(n)):
            return keep
        baseline = n / self.time(1, n)  # tokens per second without drafts
        # Trim each proposal to the drafts whose chance beats their cost at the baseline rate.
        trimmed = []
        for k, rate in proposals:
            useful = 0
            while useful < k and rate ** (useful + 1) > self.per_token * baseline:
                useful += 1
            trimmed.append(useful)
        order = sorted((i for i in range(n) if trimmed[i]), key=lambda i: -expected_run(proposals[i][1], trimmed[i]))
        best = baseline
        for i in order:
            keep[i] = trimmed[i]
            rate = self.rate_of(proposals, keep)
            if rate > best:
                best = rate
            else:
                keep[i] = 0
        return keep

    def rate_of(self, proposals: Sequence[tuple[int, float]], keep: Sequence[int]) -> float:
        """Expected tokens per second of a step in which row i verifies keep[i] drafts."""
        tokens = sum(expected_run(rate, k) for (_, rate), k in zip(proposals, keep, strict=True))
        return tokens / self.time(session_runs(keep), len(keep) + sum(keep))


def session_runs(drafts: Sequence[int]) -> int:
    """Session runs of a step whose row i verifies drafts[i] drafts: one per row with drafts, one per
    group of neighbouring rows without (see `ModelRunner.forward`)."""
    runs, grouped = 0, False
    for k in drafts:
        if k:
            runs, grouped = runs + 1, False
        elif not grouped:
            runs, grouped = runs + 1, True
    return runs


class Speculator:
    """The runner's side of speculative decoding: a drafter per new row, each decode step's drafts
    (`StepCost.plan` keeps those that pay), the outcome recorded (drafters, cost model, counts)."""

    def __init__(self, mode: str, max_len: int):
        self.mode = check_mode(mode)
        self.max_len = max_len
        self.cost = StepCost()
        self.drafted = 0  # drafts verified, all rows
        self.accepted = 0
        # adapter name ("" = the base model) -> [drafts verified, accepted]; written by the engine
        # thread, read by metrics scrapes
        self.by_adapter: dict[str, list[int]] = {}

    def start(self, row: Row) -> None:
        """Give a row starting its prefill (its sampler made) its drafter, if it may draft."""
        if row.drafter is None and row.sampler is not None:
            row.drafter = drafter_for(self.mode, row.job.params, row.job.prompt_ids, row.sampler.constraint)

    def propose(self, rows: Sequence[Row]) -> list[list[int]] | None:
        """Each row's drafts for this decode step, or None when no row drafts."""
        if self.mode == "off":
            return None
        proposals: list[list[int]] = []
        for row in rows:
            drafter = row.drafter
            # Room: a run never passes max_new_tokens, and its last token is the first that fills the context.
            room = min(row.job.params.max_new_tokens - row.generated - 1, self.max_len - row.length - 2)
            try:
                proposals.append(drafter.propose(room) if drafter is not None else [])
            except Exception:  # drafts are an optimisation: a drafter that fails stops drafting, the row goes on
                log.exception("drafting for request %s failed; it decodes without drafts", row.job.request_id)
                row.drafter = None
                proposals.append([])
        if not any(proposals):
            return None
        keep = self.cost.plan([(len(p), row.drafter.rate if p and row.drafter else 0.0)
                               for p, row in zip(proposals, rows, strict=True)])
        drafts = [p[:k] for p, k in zip(proposals, keep, strict=True)]
        return drafts if any(drafts) else None

    def record(self, rows: Sequence[Row], drafts: list[list[int]] | None,
               outcomes: Sequence[int | list[int] | Exception], seconds: float | None = None) -> None:
        """A step's outcome: every drafter sees its row's new tokens; a decode step's time (`seconds`)
        teaches the cost model (not when speculation is off: nothing would read it)."""
        if self.mode == "off":
            return
        counts: dict[str, list[int]] = {}
        fed = 0
        for i, (row, outcome) in enumerate(zip(rows, outcomes, strict=True)):
            row_drafts = drafts[i] if drafts is not None else []
            fed += 1 + len(row_drafts)
            if row.drafter is None or isinstance(outcome, Exception):
                continue
            run = outcome if isinstance(outcome, list) else [outcome]
            try:
                row.drafter.record(row_drafts, run)
            except Exception:  # never fail a step whose tokens are chosen (its samplers have advanced)
                log.exception("drafting for request %s failed; it decodes without drafts", row.job.request_id)
                row.drafter = None
                continue
            if row_drafts:
                count = counts.setdefault(row.job.adapter.name if row.job.adapter is not None else "", [0, 0])
                count[0] += len(row_drafts)
                count[1] += accepted_count(row_drafts, run)
        try:
            if seconds is not None and len(rows) == 1:  # one row: a run of 1 + drafts tokens
                self.cost.observe(1, fed, seconds)
            elif seconds is not None:  # a batch: its rows are not one row's positions to the kernels
                made = sum(len(o) if isinstance(o, list) else 1 for o in outcomes)
                self.cost.gate.observe(len(rows), drafts is not None, made, seconds)
        except Exception:  # never fail a step whose tokens are chosen; the model keeps its last fit
            log.exception("the speculation cost model could not take a step's time")
        for name, (drafted, accepted) in counts.items():
            self.drafted += drafted
            self.accepted += accepted
            total = self.by_adapter.setdefault(name, [0, 0])
            total[0] += drafted
            total[1] += accepted


def timed(run: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start
