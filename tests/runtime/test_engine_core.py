"""The engine core without a model: the finish policy, one finish per job after its release, sinks
that fail alone, prerequisites, fail-all and unloads, on a scripted executor.

Both engines run on this core; their own tests (test_batched_engine, test_isolation, the server
tests on both engines) check that each executor feeds it what it expects.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from loraplex.adapters.package.output import OutputConstraint
from loraplex.runtime.engines.base import AdapterHandle, FinishReason, GenerationJob, SamplingParams, StepOutput
from loraplex.runtime.engines.core import EngineCore, Executor, Sample, StepResult, finish_reason
from loraplex.runtime.errors import EngineFailure, InvalidRequest, ShuttingDown

EOS = 0
WAIT_S = 30


class Script(Executor):
    """Each job's samples come from `script[request_id]`, one per step: a token, an Exception, or
    (token, complete, full), or a list of those (several tokens in one step, as speculative decoding
    yields). `release_later`: ended running jobs are released one step later, as
    the batched engine's rows are."""

    def __init__(self, script: dict[str, list], release_later: bool = False):
        self.script = {k: list(v) for k, v in script.items()}
        self.release_later = release_later
        self.queued: list[GenerationJob] = []
        self.running: list[GenerationJob] = []
        self.ending: list[GenerationJob] = []
        self.in_use: dict[AdapterHandle, int] = {}
        self.unloaded: list[AdapterHandle] = []
        self.fail_next_step = False
        self.gate: Future | None = None

    def load_adapter(self, name, version, weights):
        raise NotImplementedError

    def unload_adapter(self, handle: AdapterHandle) -> bool:
        if any(job.adapter is handle for job in self.running + self.ending):
            return False
        self.unloaded.append(handle)
        return True

    def refusal(self, job):
        return InvalidRequest("refused by the executor") if job.request_id.startswith("refuse") else None

    def prerequisite(self, job):
        return self.gate if job.request_id.startswith("gated") else None

    def add(self, job):
        self.queued.append(job)

    def end(self, job):
        if job in self.queued:
            self.queued.remove(job)
            return True
        self.running.remove(job)
        if self.release_later:
            self.ending.append(job)
            return False
        return True

    @property
    def has_work(self):
        return bool(self.queued or self.running or self.ending)

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("an executor bug")
        released, self.ending = self.ending, []
        for job in self.queued:
            job.mark_started()
        self.running += self.queued
        self.queued = []
        samples = []
        for job in self.running:
            item = self.script[job.request_id].pop(0)
            for part in item if isinstance(item, list) else [item]:  # a list: several tokens in one step
                token, complete, full = part if isinstance(part, tuple) else (part, False, False)
                samples.append(Sample(job, token, complete=complete, full=full))
        return StepResult(samples, released)

    def drop_all(self):
        self.queued, self.running, self.ending = [], [], []

    def release_memory(self):
        pass

    def close(self):
        pass


class Sink:
    def __init__(self, fail_at: int = 0):
        self.outputs: list[StepOutput] = []
        self.done = threading.Event()
        self.fail_at = fail_at

    def on_output(self, output: StepOutput) -> None:
        assert not self.done.is_set(), "output after finish"
        self.outputs.append(output)
        if output.finish is not None:
            self.done.set()
        elif self.fail_at and len(self.tokens) >= self.fail_at:
            raise RuntimeError("the request layer broke")

    @property
    def tokens(self) -> list[int]:
        return [t for output in self.outputs for t in output.tokens]

    @property
    def finish(self) -> FinishReason | None:
        assert self.done.wait(WAIT_S), "the job never finished"
        return self.outputs[-1].finish


class Holding(Sink):
    """Holds the engine thread after delivering token `at` until `hold` is set; `reached` says it is there."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.hold, self.reached = at, threading.Event(), threading.Event()

    def on_output(self, output: StepOutput) -> None:
        super().on_output(output)
        if output.tokens == (self.at,):
            self.reached.set()
            assert self.hold.wait(WAIT_S), "the test never released the engine"


def job(request_id: str, max_new_tokens: int = 8, **params) -> GenerationJob:
    return GenerationJob(request_id, [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens, **params), None, Sink())


@pytest.fixture(params=[False, True], ids=["released-at-once", "released-next-step"])
def make_core(request):
    cores: list[EngineCore] = []

    def make(script: dict[str, list]) -> tuple[EngineCore, Script]:
        executor = Script(script, release_later=request.param)
        core = EngineCore(executor, max_len=64, vocab_size=100, eos_ids=[EOS], thread_name="test-core")
        core.name = "scripted"
        cores.append(core)
        return core, executor

    yield make
    for core in cores:
        core.close()


CHOICE = OutputConstraint("choice", ("yes", "no"))


@pytest.mark.parametrize(("samples", "params", "tokens", "reason"), [
    ([5, 6, EOS], {}, [5, 6], FinishReason.EOS),
    ([5, EOS, 7], {"max_new_tokens": 3, "ignore_eos": True}, [5, EOS, 7], FinishReason.LENGTH),
    ([5, EOS], {"constraint": CHOICE}, [5], FinishReason.STOP),
    ([5, (6, True, False), 9], {"constraint": CHOICE}, [5, 6], FinishReason.STOP),
    ([5, 6, 7], {"max_new_tokens": 3}, [5, 6, 7], FinishReason.LENGTH),
    ([5, (6, False, True), 9], {}, [5, 6], FinishReason.LENGTH),
])
def test_the_finish_policy_of_every_engine(make_core, samples, params, tokens, reason):
    core, _ = make_core({"r": samples})
    j = job("r", **params)
    core.submit(j)
    assert j.sink.finish is reason and j.sink.tokens == tokens and j.error is None


@pytest.mark.parametrize(("samples", "params", "outputs", "reason"), [
    ([[5, 6], [7, EOS, 8]], {}, [(5, 6), (7,)], FinishReason.EOS),
    ([[5, 6, 7, 8]], {"max_new_tokens": 3}, [(5, 6, 7)], FinishReason.LENGTH),
    ([[5, (6, True, False), 9]], {"constraint": CHOICE}, [(5, 6)], FinishReason.STOP),
    ([[5, EOS, 7]], {"max_new_tokens": 3, "ignore_eos": True}, [(5, EOS, 7)], FinishReason.LENGTH),
    ([[5, RuntimeError("row broke"), 7]], {}, [(5,)], FinishReason.CANCELLED),
])
def test_several_tokens_of_a_job_in_one_step(make_core, samples, params, outputs, reason):
    """Each token of a step's run meets the finish policy in order; tokens after the one that ends the
    job are never output; the step's tokens reach the sink in one output."""
    core, _ = make_core({"r": samples})
    j = job("r", **params)
    core.submit(j)
    assert j.sink.finish is reason
    assert [o.tokens for o in j.sink.outputs if o.tokens] == outputs


def test_finish_reason_alone():
    j = job("r", max_new_tokens=2)
    assert finish_reason(Sample(j, 5), frozenset({EOS}), 0) == (True, None)
    assert finish_reason(Sample(j, 5), frozenset({EOS}), 1) == (True, FinishReason.LENGTH)
    assert finish_reason(Sample(j, ValueError("x")), frozenset({EOS}), 0) == (False, FinishReason.CANCELLED)
    j.stop(FinishReason.STOP)
    assert finish_reason(Sample(j, 5), frozenset({EOS}), 0) == (False, FinishReason.STOP)


def test_an_error_sample_fails_its_job_only(make_core):
    core, _ = make_core({"bad": [5, RuntimeError("row broke")], "good": [5, 6, 7, EOS]})
    bad, good = job("bad"), job("good")
    core.submit(bad)
    core.submit(good)
    assert bad.sink.finish is FinishReason.CANCELLED and "row broke" in str(bad.error) and bad.sink.tokens == [5]
    assert good.sink.finish is FinishReason.EOS and good.sink.tokens[-2:] == [6, 7] and good.error is None


def test_a_stopped_job_ends_with_its_reason_and_exactly_one_finish_after_its_release(make_core):
    core, executor = make_core({"r": [5, 6, 7, 8]})
    j = job("r")
    j.sink = sink = Holding(at=5)
    core.submit(j)
    assert sink.reached.wait(WAIT_S)  # the engine thread waits there until the job is stopped
    j.stop(FinishReason.STOP)  # what a stop string found above the engine does
    sink.hold.set()
    assert j.sink.finish is FinishReason.STOP and j.sink.tokens == [5]
    assert [o.finish for o in j.sink.outputs].count(FinishReason.STOP) == 1
    assert not executor.has_work  # released before the sink heard


def test_a_sink_that_raises_ends_its_own_job(make_core):
    core, _ = make_core({"broken": [5, 6, 7, 8], "fine": [5, 6, EOS]})
    broken, fine = job("broken"), job("fine")
    broken.sink = Sink(fail_at=2)
    core.submit(broken)
    core.submit(fine)
    assert broken.sink.finish is FinishReason.CANCELLED and "broke" in str(broken.error)
    assert fine.sink.finish is FinishReason.EOS and fine.sink.tokens == [5, 6]


def test_nothing_to_generate_ends_at_once_and_refusals_come_at_submit(make_core):
    core, executor = make_core({})
    nothing = job("nothing", max_new_tokens=0)
    core.submit(nothing)
    assert nothing.sink.finish is FinishReason.LENGTH and nothing.started_at is not None
    for ids, match in (([], "empty"), ([1] * 64, "shorten the prompt"), ([100], r"lie in \[0, 100\)")):
        with pytest.raises(InvalidRequest, match=match):
            core.submit(GenerationJob("x", ids, SamplingParams(), None, Sink()))
    with pytest.raises(InvalidRequest, match="refused by the executor"):
        core.submit(job("refuse-me"))
    core.close()
    with pytest.raises(ShuttingDown):
        core.submit(job("late"))


def test_a_job_waits_for_its_prerequisite_while_others_run(make_core):
    core, executor = make_core({"gated": [5, EOS], "free": [6, EOS]})
    executor.gate = Future()
    gated, free = job("gated"), job("free")
    core.submit(gated)
    core.submit(free)
    assert free.sink.finish is FinishReason.EOS and not gated.sink.done.is_set() and gated.started_at is None
    executor.gate.set_result(None)
    assert gated.sink.finish is FinishReason.EOS and gated.sink.tokens == [5]


def test_an_executor_failure_ends_every_job_and_the_engine_keeps_serving(make_core):
    core, executor = make_core({"a": [5, 5, 5], "b": [6, 6, 6], "after": [7, EOS]})
    executor.fail_next_step = True
    a, b = job("a"), job("b")
    with core._cv:  # both in one step
        core._inbox += [a, b]
        core._cv.notify()
    for j in (a, b):
        assert j.sink.finish is FinishReason.CANCELLED and isinstance(j.error, EngineFailure)
        assert "scripted engine failed: an executor bug" in str(j.error)
    after = job("after")
    core.submit(after)
    assert after.sink.finish is FinishReason.EOS and core.healthy()


def test_unload_returns_once_the_jobs_on_the_adapter_have_ended(make_core):
    core, executor = make_core({"r": [5, 6, 7, EOS]})
    handle = AdapterHandle("a", "1", Path("a.onnx_adapter"))
    sink = Holding(at=5)
    j = GenerationJob("r", [1], SamplingParams(), handle, sink)
    core.submit(j)
    assert sink.reached.wait(WAIT_S)
    unloading = threading.Thread(target=core.unload_adapter, args=(handle,))
    unloading.start()
    sink.hold.set()
    unloading.join(WAIT_S)
    assert not unloading.is_alive() and executor.unloaded == [handle] and j.sink.finish is FinishReason.EOS


def test_the_genai_engines_lock_serves_in_order():
    """The genai engine's thread takes its lock again right after each token: a Load that asked while it
    held it must come next (a plain Lock let the engine thread win for seconds)."""
    from loraplex.runtime.engines.genai import FairLock

    lock, order = FairLock(), []
    with lock:
        loader = threading.Thread(target=lambda: [lock.__enter__(), order.append("load"), lock.__exit__()])
        loader.start()
        from tests.fixtures.serving import wait_until

        wait_until(lambda: lock._next_ticket == 2, what="the loader to ask for the lock")
    with lock:  # the engine thread, straight back for its next token
        order.append("engine")
    loader.join(WAIT_S)
    assert order == ["load", "engine"]
