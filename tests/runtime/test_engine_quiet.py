"""`Engine.quiet()`: the genai engine, whose steps hold the GIL, waits between steps while an adapter
file is read beside it; the batched engine releases the GIL as it computes and needs no wait."""

from __future__ import annotations

from contextlib import nullcontext

from loraplex.adapters.package.adapter_file import read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams

from tests.runtime.test_batched_engine import WAIT_S, Collected


def _job(request_id: str, handle, sink: Collected) -> GenerationJob:
    return GenerationJob(request_id, [5, 17, 33, 2, 9], SamplingParams(max_new_tokens=8, ignore_eos=True), handle, sink)


def test_the_genai_engine_waits_between_steps_while_quiet_is_held_and_then_decodes_the_same(recipe_package,
                                                                                             monkeypatch):
    from loraplex.runtime.engines import genai
    from loraplex.runtime.engines.genai import GenaiEngine

    monkeypatch.setattr(genai, "MAX_QUIET_S", WAIT_S)  # the bound, not the clock, must not end the wait here
    package = Package.open(recipe_package)
    engine = GenaiEngine(package, max_batch=2)
    try:
        handle = engine.load_adapter("alpha", "1", read_adapter_file(package.adapter_path("alpha"),
                                                                     package.lora_inputs))
        alone = Collected()
        engine.submit(_job("alone", handle, alone))
        expected = alone.wait()
        held, gate = Collected(pause_at=2), engine.executor
        engine.submit(_job("held", handle, held))
        assert held.reached.wait(WAIT_S)  # the engine thread is inside a step, at the job's 2nd token
        with engine.quiet():
            held.resume()
            assert gate.waited_quiet.wait(WAIT_S), "the engine did not wait for the quiet holder"
            assert not held.done.is_set() and len(held.tokens) < 8
        assert held.wait() == expected and held.finish == FinishReason.LENGTH
    finally:
        engine.close()


def test_the_batched_engine_needs_no_quiet(recipe_package):
    from loraplex.runtime.engines.batched import BatchedEngine

    engine = BatchedEngine(Package.open(recipe_package), intra_op_threads=2, max_batch=2)
    try:
        assert isinstance(engine.quiet(), nullcontext)
        sink = Collected()
        with engine.quiet():  # decoding goes on while it is held
            engine.submit(_job("free", None, sink))
            assert len(sink.wait()) == 8
    finally:
        engine.close()


def test_the_genai_engine_waits_for_quiet_at_most_its_bound(recipe_package, monkeypatch):
    """A holder that takes longer than the bound (a slow disk) cannot stall decoding: past it, steps go on."""
    from loraplex.runtime.engines import genai
    from loraplex.runtime.engines.genai import GenaiEngine

    monkeypatch.setattr(genai, "MAX_QUIET_S", 0.0)
    engine = GenaiEngine(Package.open(recipe_package), max_batch=2)
    try:
        sink = Collected()
        with engine.quiet():
            engine.submit(_job("bounded", None, sink))
            assert len(sink.wait()) == 8
        assert not engine.executor.waited_quiet.is_set()
    finally:
        engine.close()
