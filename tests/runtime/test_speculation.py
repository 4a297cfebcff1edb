"""Speculative decoding's pure parts: prompt lookup, draft budgets, verification (numpy, no model).

A synthetic "model" (`toy_logits`: logits drawn from a generator seeded by the prefix) stands in for
the graph: plain decoding asks it one position at a time, speculative decoding asks it at every
draft position, as the verification step's logits would be.
"""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest
from loraplex.runtime.engines.base import SamplingParams
from loraplex.runtime.engines.batched.sampling import NonFiniteLogits, RowSampler, distribution
from loraplex.runtime.engines.batched.speculation import (
    DraftBudget,
    DraftGate,
    PromptLookup,
    RowDrafter,
    StepCost,
    accepted_count,
    check_mode,
    choose_runs,
    drafter_for,
    expected_run,
    session_runs,
    verify_run,
)

VOCAB = 12


def toy_logits(prefix: list[int], vocab: int = VOCAB, spread: float = 2.0) -> np.ndarray:
    seed = zlib.crc32(np.asarray(prefix, dtype=np.int64).tobytes())
    return (np.random.default_rng(seed).standard_normal(vocab) * spread).astype(np.float32)


def plain_decode(params: SamplingParams, prompt: list[int], n: int, constraint=None) -> list[int]:
    sampler = RowSampler(params, prompt, VOCAB, constraint)
    out: list[int] = []
    while len(out) < n:
        out.append(sampler.choose(toy_logits(prompt + out)))
    return out


def speculative_decode(params: SamplingParams, prompt: list[int], n: int, propose, constraint=None) -> list[int]:
    """Decode with `propose(prompt + out) -> drafts`; returns the first n tokens."""
    sampler = RowSampler(params, prompt, VOCAB, constraint)
    out: list[int] = []
    while len(out) < n:
        drafts = propose(prompt + out)
        logits = np.stack([toy_logits(prompt + out + drafts[:j]) for j in range(len(drafts) + 1)])
        run = verify_run(logits, sampler, drafts)
        assert 1 <= len(run) <= len(drafts) + 1
        assert run[:-1] == drafts[: len(run) - 1]
        out.extend(run)
    return out[:n]


def oracle(params: SamplingParams, prompt: list[int], truth: list[int], k: int, wrong_every: int):
    """Drafts that follow the plain greedy output `truth` but are wrong at every `wrong_every`-th draft."""
    calls = [0]

    def propose(seq: list[int]) -> list[int]:
        calls[0] += 1
        done = len(seq) - len(prompt)
        drafts = list(truth[done:done + k])
        if drafts and calls[0] % wrong_every == 0:
            flip = min(len(drafts) - 1, calls[0] % k)
            drafts[flip] = (drafts[flip] + 1) % VOCAB
        return drafts

    return propose


def test_modes_are_checked():
    assert check_mode("auto") == "auto"
    with pytest.raises(ValueError, match="speculation must be one of"):
        check_mode("always")


def test_prompt_lookup_proposes_what_followed_the_longest_latest_match():
    lookup = PromptLookup([5, 6, 7, 8, 9, 1, 6, 7, 2, 3], max_ngram=3, min_ngram=1)
    lookup.extend([6, 7])  # suffix (6, 7): latest earlier occurrence is followed by 2, 3
    assert lookup.propose(4) == [2, 3, 6, 7]
    assert lookup.propose(1) == [2]
    lookup.extend([8])  # (6, 7, 8) matches the first occurrence only: longest n wins over latest
    assert lookup.propose(3) == [9, 1, 6]
    assert lookup.propose(0) == []


def test_prompt_lookup_never_matches_the_suffix_itself_and_respects_min_ngram():
    lookup = PromptLookup([1, 2, 3], min_ngram=2)
    assert lookup.propose(3) == []  # (2, 3) occurs only as the suffix
    lookup.extend([4, 2])
    assert lookup.propose(3) == []  # only one token (2) matches: below min_ngram
    lookup.extend([3])
    assert lookup.propose(3) == [4, 2, 3]
    with pytest.raises(ValueError):
        PromptLookup([], min_ngram=3, max_ngram=2)


def test_draft_budget_grows_shrinks_and_rests_longer_each_time():
    budget = DraftBudget(max_length=6, length=2, patience=2, rest=3, max_rest=8)
    assert budget.take() == 2
    budget.record(2, 2)
    assert budget.take() == 3
    budget.record(3, 3)
    assert budget.take() == 4
    budget.record(4, 4)
    assert budget.take() == 6
    budget.record(6, 6)
    assert budget.take() == 6  # capped
    budget.record(6, 2)
    assert budget.take() == 3  # one more than accepted
    budget.record(3, 0)
    assert budget.take() == 1
    budget.record(1, 0)  # second miss in a row: rest 3 steps
    assert [budget.take() for _ in range(4)] == [0, 0, 0, 1]
    budget.record(1, 0)
    budget.take()
    budget.record(1, 0)
    assert [budget.take() for _ in range(7)] == [0] * 6 + [1]  # the next rest is twice as long
    budget.record(1, 1)  # accepted: rests start short again
    budget.record(2, 0)
    budget.take()
    budget.record(1, 0)
    assert [budget.take() for _ in range(4)] == [0, 0, 0, 1]
    budget.record(0, 0)  # nothing drafted: nothing learnt
    assert budget.take() == 1


def test_accepted_count():
    assert accepted_count([1, 2, 3], [1, 2, 5]) == 2
    assert accepted_count([1, 2, 3], [1, 2, 3, 4]) == 3
    assert accepted_count([1, 2, 3], [1]) == 1  # ended early (EOS) on an accepted draft
    assert accepted_count([1, 2], [7]) == 0
    assert accepted_count([], [7]) == 0


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.8)],
                         ids=["greedy", "greedy+penalty"])
@pytest.mark.parametrize("wrong_every", [1, 2, 3, 1000])
def test_greedy_speculation_yields_exactly_the_plain_greedy_tokens(params, wrong_every):
    """Whatever the drafts (all right, some wrong, each step's first or a later one wrong), the tokens
    equal plain greedy decoding; with a repetition penalty, position j's scores see drafts 0..j-1."""
    prompt = [3, 1, 4, 1, 5]
    truth = plain_decode(params, prompt, 40)
    if params.repetition_penalty != 1.0:  # the penalty must change the tokens, or this proves nothing
        assert truth != plain_decode(SamplingParams(), prompt, 40)
    for k in (1, 3, 5):
        got = speculative_decode(params, prompt, 40, oracle(params, prompt, truth, k, wrong_every))
        assert got == truth


def test_greedy_speculation_with_a_penalty_sees_each_accepted_draft():
    """Position 1's argmax is token 2 unless token 2 was seen at position 0 (the penalty then makes it 3)."""
    logits = np.zeros((3, 5), dtype=np.float32)
    logits[0, 2] = 5.0
    logits[1, 2], logits[1, 3] = 4.0, 3.0
    logits[2, 4] = 1.0
    sampler = RowSampler(SamplingParams(repetition_penalty=2.0), [0], 5)
    assert verify_run(logits, sampler, [2, 2]) == [2, 3]
    sampler = RowSampler(SamplingParams(), [0], 5)
    assert verify_run(logits, sampler, [2, 2]) == [2, 2, 4]


def test_choose_runs_mixes_plain_penalised_sampled_and_broken_rows():
    logits = np.stack([np.stack([toy_logits([r, j]) for j in range(4)]) for r in range(4)])
    logits[3, 1, 5] = np.nan  # row 3 breaks at its second position
    samplers = [RowSampler(SamplingParams(), [0], VOCAB),
                RowSampler(SamplingParams(repetition_penalty=1.5), [0], VOCAB),
                RowSampler(SamplingParams(temperature=0.7, seed=1), [0], VOCAB),
                RowSampler(SamplingParams(), [0], VOCAB)]
    best = logits.argmax(-1)
    drafts = [[int(best[0, 0]), int(best[0, 1]) + 1], [], [1, 2, 3], [int(best[3, 0]), 0]]
    runs = choose_runs(logits, samplers, drafts)
    assert runs[0] == [best[0, 0], best[0, 1]]  # one draft accepted, the model's token for the second
    assert runs[1] == [RowSampler(SamplingParams(repetition_penalty=1.5), [0], VOCAB).choose(logits[1, 0])]
    assert isinstance(runs[2], list) and 1 <= len(runs[2]) <= 4
    assert isinstance(runs[3], NonFiniteLogits)
    # EOS (a stop id) ends a run on an accepted draft: nothing after it could be output.
    runs = choose_runs(logits[:1], samplers[:1], [[int(best[0, 0]), int(best[0, 1])]], stop_ids={int(best[0, 0])})
    assert runs == [[best[0, 0]]]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, seed=5),
                                    SamplingParams(temperature=1.3, top_p=0.9, repetition_penalty=1.4, seed=6)])
def test_seeded_sampling_gives_the_same_tokens_with_or_without_drafts(params):
    """A sampled row draws once per token from its own generator, drafts or not: the same seed gives
    the same output whatever is proposed."""
    prompt = [1, 2, 3]
    truth = plain_decode(params, prompt, 60)
    assert len(set(truth)) > 3
    for k, wrong_every in ((1, 2), (4, 3), (6, 1000)):
        assert speculative_decode(params, prompt, 60, oracle(params, prompt, truth, k, wrong_every)) == truth
    junk = speculative_decode(params, prompt, 60, lambda seq: [seq[-1]] * 3)
    assert junk == truth


def test_eos_ends_a_run_unless_the_row_ignores_it():
    logits = np.zeros((3, VOCAB), dtype=np.float32)
    logits[:, 0] = 1.0  # EOS (0) everywhere
    runs = choose_runs(logits[None].repeat(2, 0), [RowSampler(SamplingParams(), [1], VOCAB),
                                                  RowSampler(SamplingParams(ignore_eos=True), [1], VOCAB)],
                       [[0, 0], [0, 0]], stop_ids={0})
    assert runs == [[0], [0, 0, 0]]


def exact_first_two(params: SamplingParams, prompt: list[int]) -> dict[tuple[int, int], float]:
    """p(t0, t1) of plain sampling, from the rows' processed distributions."""
    joint: dict[tuple[int, int], float] = {}
    for t0, p0 in zip(*distribution(_processed(params, prompt, []), params), strict=True):
        for t1, p1 in zip(*distribution(_processed(params, prompt, [int(t0)]), params), strict=True):
            joint[(int(t0), int(t1))] = float(p0 * p1)
    return joint


def _processed(params: SamplingParams, prompt: list[int], out: list[int]) -> np.ndarray:
    sampler = RowSampler(params, prompt, VOCAB)
    for token in out:
        sampler.seen[token] = sampler.penalize
    return sampler.process(toy_logits(prompt + out, spread=1.0))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.8, top_k=5, seed=12),
    SamplingParams(temperature=1.2, top_p=0.8, repetition_penalty=1.6, seed=13),
], ids=["plain", "top-k", "top-p+penalty"])
def test_sampled_speculation_keeps_the_distribution(params):
    """The first two tokens drawn with drafts (a likely draft, then a draft outside the top-k/top-p
    set) follow the exact joint distribution of plain sampling: total variation below 0.03 over
    20k draws (the sampling noise is about 0.01)."""
    prompt = [2, 7]
    exact = exact_first_two(params, prompt)
    sampler_seed = np.random.default_rng(params.seed)
    draws = 20_000
    counts: Counter[tuple[int, int]] = Counter()
    likely = int(np.argmax(toy_logits(prompt, spread=1.0)))
    for i in range(draws):
        sampler = RowSampler(params, prompt, VOCAB)
        sampler.rng = np.random.default_rng(sampler_seed.integers(1 << 62))
        drafts = [likely, i % VOCAB]
        logits = np.stack([toy_logits(prompt + drafts[:j], spread=1.0) for j in range(3)])
        run = verify_run(logits, sampler, drafts)
        if len(run) < 2:  # the first draft was rejected: the second token comes from a plain step
            run.append(sampler.choose(toy_logits(prompt + run, spread=1.0)))
        counts[(run[0], run[1])] += 1
    keys = set(exact) | set(counts)
    tv = 0.5 * sum(abs(exact.get(key, 0.0) - counts[key] / draws) for key in keys)
    assert set(counts) <= set(exact)  # never a pair plain sampling cannot draw
    assert tv < 0.03


def test_a_certain_draft_is_always_accepted_and_an_impossible_one_never():
    logits = np.full((2, VOCAB), -50.0, dtype=np.float32)
    logits[0, 4] = 50.0  # p(4) = 1 within float precision
    logits[1, 1] = 0.0
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    for _ in range(50):
        assert verify_run(logits, RowSampler(params, [0], VOCAB), [4]) == [4, 1]
        run = verify_run(logits, RowSampler(params, [0], VOCAB), [9])  # outside the top-k: p = 0
        assert run[0] != 9 and len(run) == 1


# ---- output constraints (llguidance on the recipe package's tokenizer) ----

@pytest.fixture(scope="module")
def guidance(recipe_package):
    from loraplex.adapters.package.genai_config import GenaiConfig
    from loraplex.runtime.engines.guidance import Guidance
    from loraplex.runtime.server.tokenizer import PackageTokenizer

    config = GenaiConfig.load(recipe_package)
    return Guidance(recipe_package / "tokenizer.json", config.vocab_size, config.eos_token_ids), \
        PackageTokenizer(recipe_package), config


def test_contract_drafts_are_the_forced_tokens_and_lookup_drafts_are_cut_to_the_allowed(guidance):
    from loraplex.adapters.package.output import OutputConstraint

    guide, tokenizer, config = guidance
    schema = '{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"],' \
             '"additionalProperties":false}'
    constraint = guide.row(OutputConstraint("json_schema", schema))
    drafter = RowDrafter("contract", [1, 2], constraint, max_draft=16)
    drafts = drafter.propose(room=16)
    assert drafts and tokenizer.decode(drafts).startswith('{"answer":')
    assert constraint.matcher.validate_tokens(drafts) == len(drafts)
    assert drafter.propose(room=2) == drafts[:2]
    assert drafter.propose(room=0) == []
    assert RowDrafter("lookup", [1, 2], constraint).contract is False
    assert RowDrafter("off", [1, 2], constraint).active is False

    # A lookup draft the constraint forbids is cut where it becomes forbidden.
    d1, d2, d3, a = (tokenizer.encode(c)[0] for c in "123a")
    assert all(len(tokenizer.encode(c)) == 1 for c in "123a")
    digits = OutputConstraint("regex", "[0-9]{6}")
    cut = RowDrafter("lookup", [d1, d2, d3, a, d1, d2], guide.row(digits), max_draft=4)
    cut.lookup_budget.length = 4
    assert cut.lookup.propose(4) == [d3, a, d1, d2]
    assert cut.propose(room=4) == [d3]
    none = RowDrafter("lookup", [d1, d2, a, d3, d1, d2], guide.row(digits), max_draft=4)
    assert none.propose(room=4) == []


def test_greedy_constrained_speculation_equals_plain_and_stops_at_completion(guidance):
    """Greedy tokens under a regex equal plain decoding with the mask, whatever the drafts; the
    constraint advances only with accepted tokens, and a run ends where the constraint completes."""
    from loraplex.adapters.package.output import OutputConstraint

    guide, tokenizer, config = guidance
    vocab = config.vocab_size
    regex = OutputConstraint("regex", "(ab|cd)[0-9]{2}x")

    def logits_of(prefix: list[int]) -> np.ndarray:
        seed = zlib.crc32(np.asarray(prefix, dtype=np.int64).tobytes())
        return np.random.default_rng(seed).standard_normal(vocab).astype(np.float32)

    prompt = [5, 6]
    plain = RowSampler(SamplingParams(), prompt, vocab, guide.row(regex))
    truth: list[int] = []
    while not plain.constraint.complete:
        truth.append(plain.choose(logits_of(prompt + truth)))
    assert tokenizer.decode(truth)[:2] in ("ab", "cd") and tokenizer.decode(truth).endswith("x")

    for wrong in (None, 0, 1):
        sampler = RowSampler(SamplingParams(), prompt, vocab, guide.row(regex))
        out: list[int] = []
        while not sampler.constraint.complete:
            drafts = list(truth[len(out):len(out) + 4]) + [7, 7]  # past the end: the run must stop there
            if wrong is not None and len(drafts) > wrong:
                drafts[wrong] = (drafts[wrong] + 1) % vocab
            logits = np.stack([logits_of(prompt + out + drafts[:j]) for j in range(len(drafts) + 1)])
            run = verify_run(logits, sampler, drafts)
            out.extend(run)
        assert out == truth


def test_rows_that_cannot_draft_get_no_drafter():
    assert drafter_for("off", SamplingParams(), [1, 2], None) is None
    assert drafter_for("contract", SamplingParams(), [1, 2], None) is None  # no constraint: no source
    assert drafter_for("auto", SamplingParams(logprobs=2), [1, 2], None) is not None  # each token's, per run
    assert drafter_for("auto", SamplingParams(forced=(3, 4)), [1, 2], None) is None
    assert drafter_for("lookup", SamplingParams(temperature=0.7), [1, 2], None) is not None


def test_drafter_records_runs_and_counts_acceptance():
    drafter = RowDrafter("lookup", [1, 2, 3, 4, 1, 2], None, max_draft=4)
    drafts = drafter.propose(room=10)
    assert drafts == [3, 4]  # the budget starts at 2
    drafter.record(drafts, [3, 4, 9])
    assert (drafter.drafted, drafter.accepted) == (2, 2)
    assert drafter.lookup.tokens[-3:] == [3, 4, 9]
    assert drafter.propose(room=10) == []  # (4, 9) never occurred
    drafter.record([], [1])
    drafter.record([], [2])
    assert drafter.propose(room=1) == [3]  # the room caps the draft
    drafter.record([3], [5])
    assert (drafter.drafted, drafter.accepted) == (3, 2)


def test_expected_run_and_session_runs():
    assert expected_run(0.5, 2) == pytest.approx(1.75)
    assert expected_run(1.0, 3) == 4.0
    assert expected_run(0.9, 0) == 1.0
    assert session_runs([0, 0, 3, 0, 2, 2, 0]) == 6  # neighbours without drafts share a run
    assert session_runs([0] * 5) == 1


def test_step_cost_keeps_drafts_that_pay_and_learns_the_machine():
    cost = StepCost(per_run=6e-3, per_token=1e-3)
    assert cost.plan([(8, 0.9)]) == [8]  # one row, drafts likely right: verify them all
    assert cost.plan([(8, 0.1)]) == [0]  # unlikely: a plain step is faster
    assert 0 < cost.plan([(8, 0.6)])[0] < 8  # only the first few are worth their cost
    # In a batch, a row with drafts runs alone (its own session run): seldom worth it.
    assert cost.plan([(0, 0.0)] * 3 + [(6, 0.9)] + [(0, 0.0)] * 4) == [0] * 8
    assert cost.plan([(0, 0.0), (4, 0.999)]) == [0, 4]  # at the end of the batch it costs one run
    # Measured steps move the model: a machine where tokens are expensive and runs cheap.
    for _ in range(200):
        for runs, tokens in ((1, 1), (1, 5), (2, 9), (3, 12)):
            cost.observe(runs, tokens, runs * 1e-3 + tokens * 4e-3)
    assert cost.per_run == pytest.approx(1e-3, rel=0.1) and cost.per_token == pytest.approx(4e-3, rel=0.1)
    assert cost.plan([(8, 0.6)]) == [0]


def test_draft_gate_follows_the_measured_rate_per_batch_size_and_explores():
    gate = DraftGate(explore_every=4, min_samples=2)
    assert gate.allows(1)  # nothing measured: try drafts first
    gate.observe(1, True, 3, 0.010)
    gate.observe(1, True, 3, 0.010)  # 300 tokens/s with drafts
    assert not gate.allows(1)  # then measure plain steps
    gate.observe(1, False, 1, 0.005)
    gate.observe(1, False, 1, 0.005)  # 200 tokens/s without
    assert [gate.allows(1) for _ in range(8)] == [True, True, True, False] * 2  # every 4th: the other side
    assert gate.allows(8)  # another batch size learns on its own
    for _ in range(3):
        gate.observe(8, True, 10, 0.100)  # 100/s: drafting rows run alone, slower in a batch
        gate.observe(8, False, 8, 0.040)  # 200/s
    assert sum(gate.allows(8) for _ in range(40)) == 10  # only the exploring steps draft
    assert DraftGate.bucket(3) == DraftGate.bucket(4) == 4 and DraftGate.bucket(5) == 8 and DraftGate.bucket(2) == 2


def test_a_run_carries_each_token_s_logprobs():
    logits = np.stack([toy_logits([1, j]) for j in range(3)])
    best = logits.argmax(-1)
    sampler = RowSampler(SamplingParams(logprobs=1), [0], VOCAB)
    run = verify_run(logits, sampler, [int(best[0]), int(best[1])])
    assert run == list(best) and len(run.logprobs) == 3
    for j, entry in enumerate(run.logprobs):
        shifted = logits[j] - logits[j].max()
        assert entry.logprob == pytest.approx(float(shifted[best[j]] - np.log(np.exp(shifted).sum())), abs=1e-4)


def test_auto_drafts_only_on_packages_where_verification_is_token_exact():
    from loraplex.runtime.engines.batched.speculation import resolve_mode

    assert resolve_mode("auto", "fp32") == "auto"
    assert resolve_mode("auto", "int4") == "off"  # multi-token steps round otherwise than one-token steps
    assert resolve_mode("auto", "fp16") == "off"
    assert resolve_mode("on", "int4") == "on"  # asked for knowingly
    assert resolve_mode("lookup", "int4") == "lookup"
    assert resolve_mode("contract", "int4") == "contract"
    assert resolve_mode("off", "fp32") == "off"
    with pytest.raises(ValueError):
        resolve_mode("sometimes", "fp32")
