"""Speculative decoding in the batched engine, on the recipe package: every request's tokens and
finish equal plain decoding (speculation off) while rows verify drafts, right or wrong, side by side
with rows that do not, across adapters.

The recipe model is random, so it copies nothing: prompt lookup drafts fire on repeating prompts and
are rejected; an oracle drafter (the plain output, wrong at every third step) makes accepted and
rejected drafts, with max_new_tokens and EOS falling inside accepted runs.
"""

from __future__ import annotations

import pytest
from loraplex.adapters.package.output import OutputConstraint
from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams
from loraplex.runtime.engines.batched.speculation import PromptLookup, Speculator, StepCost

from tests.runtime.test_batched_engine import PROMPTS, WAIT_S, Collected
from tests.runtime.test_batched_engine import make_engine as make_engine  # noqa: F401 (fixtures)
from tests.runtime.test_batched_engine import package as package  # noqa: F401

REPEATING = [5, 17, 33, 2, 99, 4, 7] * 3 + [5, 17]


class AlwaysDraft(StepCost):
    """Every proposed draft is verified (the real model decides by cost; tests want drafts)."""

    def plan(self, proposals):
        return [k for k, _ in proposals]


class Oracle:
    """Drafts the row's known plain output, one draft wrong at every third step."""

    def __init__(self, truth: list[int], k: int):
        self.truth, self.k, self.steps, self.done = truth, k, 0, 0
        self.drafted = self.accepted = 0
        self.rate = 0.9

    def propose(self, room: int) -> list[int]:
        self.steps += 1
        drafts = list(self.truth[self.done:self.done + min(self.k, room)])
        if drafts and self.steps % 3 == 0:
            drafts[-1] = (drafts[-1] + 1) % 2048
        return drafts

    def record(self, drafts, run) -> None:
        self.done += len(run)


class OracleSpeculator(Speculator):
    def __init__(self, max_len: int, truths: dict[str, list[int]], k: int = 4):
        super().__init__("lookup", max_len)
        self.cost = AlwaysDraft()
        self.truths, self.k = truths, k

    def start(self, row) -> None:
        if row.drafter is None:
            row.drafter = Oracle(self.truths[row.job.request_id], self.k)


def run_all(engine, handles, requests) -> dict[str, tuple[list[int], FinishReason]]:
    """Submit every request at once (they share the batch); their tokens and finish by key."""
    sinks = {}
    for key, (prompt, name, params) in requests.items():
        sinks[key] = Collected()
        engine.submit(GenerationJob(key, list(prompt), SamplingParams(**params), handles.get(name), sinks[key]))
    out = {}
    for key, sink in sinks.items():
        assert sink.done.wait(WAIT_S)
        out[key] = (list(sink.tokens), sink.finish)
    return out


REQUESTS = {
    "base": (PROMPTS[0], None, {"max_new_tokens": 24}),
    "alpha": (PROMPTS[1], "alpha", {"max_new_tokens": 9}),  # ends inside an accepted run
    "beta": (PROMPTS[2], "beta", {"max_new_tokens": 17, "repetition_penalty": 1.3}),
    "gamma": (REPEATING, "gamma", {"max_new_tokens": 20}),
    "sampled": (PROMPTS[3], "alpha", {"max_new_tokens": 15, "temperature": 0.8, "top_k": 50, "seed": 3}),
    "plain": (PROMPTS[0], "gamma", {"max_new_tokens": 12}),  # no drafts (see the oracle below)
}


def test_oracle_drafts_accepted_and_rejected_give_the_plain_tokens_in_a_mixed_batch(make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=4)
    engine.runner.speculator = Speculator("off", engine.max_len)
    plain = run_all(engine, handles, REQUESTS)
    assert all(len(tokens) == REQUESTS[k][2]["max_new_tokens"] for k, (tokens, _) in plain.items())

    truths = {k: tokens for k, (tokens, _) in plain.items()}
    truths["plain"] = []  # this row never drafts: it shares runs with its neighbours
    speculator = engine.runner.speculator = OracleSpeculator(engine.max_len, truths)
    assert run_all(engine, handles, REQUESTS) == plain
    assert engine.scheduler.stats.decode_steps > 0
    assert speculator.drafted > speculator.accepted > 0  # drafts were verified, some rejected


def test_eos_inside_an_accepted_run_ends_the_row_there(make_engine):
    engine, handles = make_engine(max_batch=4, max_slots=2)
    engine.runner.speculator = Speculator("off", engine.max_len)
    truth = run_all(engine, handles, {"r": (PROMPTS[0], "beta", {"max_new_tokens": 16})})["r"][0]
    engine.eos_ids = frozenset({truth[5]})  # pretend the 6th token is EOS (the runner keeps the real one)
    first = truth.index(truth[5])
    speculator = engine.runner.speculator = OracleSpeculator(engine.max_len, {"r": truth}, k=8)
    tokens, finish = run_all(engine, handles, {"r": (PROMPTS[0], "beta", {"max_new_tokens": 16})})["r"]
    assert (tokens, finish) == (truth[:first], FinishReason.EOS)
    assert speculator.accepted >= first  # the EOS came inside an accepted run


def eager(speculator: Speculator) -> Speculator:
    """`speculator` verifying every proposal, its rows' prompt lookup matching from single tokens on
    (on a random model's output, matches then come often)."""
    start = speculator.start

    def start_eagerly(row) -> None:
        fresh = row.drafter is None
        start(row)
        if fresh and row.drafter is not None and row.drafter.lookup is not None:
            row.drafter.lookup = PromptLookup(row.job.prompt_ids, min_ngram=1)

    speculator.start = start_eagerly  # type: ignore[method-assign]
    speculator.cost = AlwaysDraft()
    return speculator


def test_lookup_drafts_fire_on_a_repeating_prompt_and_change_nothing(make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=4)
    text = list(range(1, 200)) * 2
    requests = {name or "base": (text, name, {"max_new_tokens": 24}) for name in (None, "alpha", "beta")}
    requests["penalised"] = (text, "gamma", {"max_new_tokens": 24, "repetition_penalty": 1.2})
    engine.runner.speculator = Speculator("off", engine.max_len)
    plain = run_all(engine, handles, requests)
    speculator = engine.runner.speculator = eager(Speculator("lookup", engine.max_len))
    assert run_all(engine, handles, requests) == plain
    assert speculator.drafted > 0  # the prompt's tokens were proposed (a random model rejects them)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_contract_drafts_of_a_choice_constraint_give_the_plain_tokens(make_engine, greedy):
    """The constraint's forced tokens are drafted and verified under the mask at each position."""
    engine, handles = make_engine(max_batch=4, max_slots=2)
    choice = OutputConstraint("choice", ("the quick brown fox jumps", "the quick brown cat sleeps"))
    params = {"max_new_tokens": 30, "constraint": choice}
    if not greedy:
        params.update(temperature=1.0, seed=11)
    requests = {"c": (PROMPTS[0], "alpha", params), "free": (PROMPTS[1], "beta", {"max_new_tokens": 10})}
    engine.runner.speculator = Speculator("off", engine.max_len)
    plain = run_all(engine, handles, requests)
    assert plain["c"][1] is FinishReason.STOP
    speculator = engine.runner.speculator = Speculator("contract", engine.max_len)
    speculator.cost = AlwaysDraft()
    assert run_all(engine, handles, requests) == plain
    assert speculator.accepted > 0  # "the quick brown " is forced, and the model takes it


def test_int4_package_oracle_drafts_give_the_plain_tokens(request):
    """int4 base (MatMulNBits): a verification step computes its positions as a prompt does, which
    rounds differently from one-token steps; the greedy tokens stay the plain ones on the tiny
    package, whose scores are far from ties. (A sampled row's draw may land on the other side of a
    boundary: its distribution is kept, not its exact tokens.)"""
    requests = {k: v for k, v in REQUESTS.items() if k != "sampled"}
    from pathlib import Path

    from loraplex.adapters.package.reader import Package
    from loraplex.runtime.engines.batched import BatchedEngine

    from tests.fixtures.packages import TINY_SPEC
    from tests.fixtures.reference import package_files
    from tests.runtime.test_batched_engine import load

    files = package_files(Path(request.getfixturevalue("package_factory")(TINY_SPEC, precision="int4")))
    engine = BatchedEngine(Package.open(files.root), max_batch=8, max_slots=4, intra_op_threads=2)
    try:
        assert engine.runner.speculator.mode == "off"  # "auto" drafts only where it is token-exact
        handles = {name: load(engine, files.root, name, "1", path) for name, path in files.adapters.items()}
        plain = run_all(engine, handles, requests)
        truths = {k: tokens for k, (tokens, _) in plain.items()}
        truths["plain"] = []
        speculator = engine.runner.speculator = OracleSpeculator(engine.max_len, truths)
        assert run_all(engine, handles, requests) == plain
        assert speculator.drafted > speculator.accepted > 0
    finally:
        engine.close()


class Broken:
    """A drafter with a bug: it fails to propose, or to record a step (`at`)."""

    rate = 0.9

    def __init__(self, at: str):
        self.at = at

    def propose(self, room: int) -> list[int]:
        if self.at == "propose":
            raise RuntimeError("a drafter bug")
        return [1, 2]

    def record(self, drafts, run) -> None:
        if self.at == "record":
            raise RuntimeError("a drafter bug")


@pytest.mark.parametrize("at", ["propose", "record"])
def test_a_drafter_that_fails_stops_drafting_and_its_row_goes_on(make_engine, at):
    engine, handles = make_engine(max_batch=4, max_slots=2)
    requests = {"broken": (PROMPTS[0], "alpha", {"max_new_tokens": 8}),
                "other": (PROMPTS[1], "beta", {"max_new_tokens": 8})}
    engine.runner.speculator = Speculator("off", engine.max_len)
    plain = run_all(engine, handles, requests)
    speculator = engine.runner.speculator = OracleSpeculator(engine.max_len, {k: t for k, (t, _) in plain.items()})
    start = speculator.start

    def start_broken(row) -> None:
        start(row)
        if row.job.request_id == "broken":
            row.drafter = Broken(at)

    speculator.start = start_broken
    assert run_all(engine, handles, requests) == plain
    assert speculator.accepted > 0  # the other row still drafted


class WithLogprobs(Collected):
    def __init__(self):
        super().__init__()
        self.logprobs: list = []

    def on_output(self, output) -> None:
        self.logprobs.extend(output.logprobs)
        super().on_output(output)


def test_a_row_asking_for_logprobs_gets_each_token_s_from_a_run(make_engine):
    engine, handles = make_engine(max_batch=4, max_slots=2)
    params = SamplingParams(max_new_tokens=12, logprobs=3)

    def once() -> WithLogprobs:
        sink = WithLogprobs()
        engine.submit(GenerationJob("lp", list(PROMPTS[2]), params, handles["gamma"], sink))
        assert sink.done.wait(WAIT_S)
        return sink

    engine.runner.speculator = Speculator("off", engine.max_len)
    plain = once()
    speculator = engine.runner.speculator = OracleSpeculator(engine.max_len, {"lp": plain.tokens})
    drafted = once()
    assert drafted.tokens == plain.tokens and speculator.accepted > 0
    assert len(drafted.logprobs) == len(plain.logprobs) == 12
    for a, b in zip(drafted.logprobs, plain.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
