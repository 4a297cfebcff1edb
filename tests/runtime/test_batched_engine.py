"""The batched engine: greedy tokens of every request equal onnxruntime-genai's for the same
adapter and prompt, whatever shares the batch; slots, joins, cancellation, hot replacement."""

from __future__ import annotations

import mmap
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from loraplex.adapters.package.adapter_file import AdapterFileError, read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import AdapterHandle, FinishReason, GenerationJob, SamplingParams, StepOutput
from loraplex.runtime.engines.batched import BatchedEngine
from loraplex.runtime.errors import EngineFailure, InvalidRequest

from tests.fixtures.reference import PackageFiles, genai_reference, package_files

WAIT_S = 120
# Prompt lengths 1 to 14: the prompt-length mix GQA must handle through the masks.
PROMPTS = [
    [5, 17, 33, 2, 99, 4, 7],
    [12, 13],
    [100, 200, 300, 400, 500, 600, 7, 8, 9, 10, 11, 12, 13, 14],
    [42],
]


class Collected:
    """A job's token sink: tokens in order, the finish reason, and an event for waiting.

    With `pause_at=n` the sink holds the engine thread at the job's n-th token until `resume()`:
    the test then acts (submits, cancels) at a known point of the decoding, whatever the speed.
    """

    def __init__(self, pause_at: int = 0):
        self.tokens: list[int] = []
        self.finish: FinishReason | None = None
        self.done = threading.Event()
        self.reached = threading.Event()  # set at the `pause_at`-th token
        self._pause_at = pause_at
        self._resume = threading.Event()

    def resume(self) -> None:
        self._resume.set()

    def on_output(self, output: StepOutput) -> None:
        assert self.finish is None, "output after finish"
        for token in output.tokens:
            self.tokens.append(token)
            if len(self.tokens) == self._pause_at:
                self.reached.set()
                assert self._resume.wait(WAIT_S), "the test never resumed the engine"
        if output.finish is not None:
            self.finish = output.finish
            self.reached.set()
            self.done.set()

    def wait(self) -> list[int]:
        assert self.done.wait(WAIT_S), "job did not finish"
        return self.tokens


@pytest.fixture(scope="module")
def package(recipe_package) -> PackageFiles:
    return package_files(recipe_package)


def load(engine: BatchedEngine, package_dir: Path, name: str, version: str, path: Path) -> AdapterHandle:
    return engine.load_adapter(name, version, read_adapter_file(path, Package.open(package_dir).lora_inputs))


@pytest.fixture
def make_engine(package):
    engines: list[BatchedEngine] = []

    def make(**kwargs) -> tuple[BatchedEngine, dict[str, AdapterHandle]]:
        engine = BatchedEngine(Package.open(package.root), intra_op_threads=2, **kwargs)
        engines.append(engine)
        handles = {name: load(engine, package.root, name, "1", path) for name, path in package.adapters.items()}
        return engine, handles

    yield make
    for engine in engines:
        engine.close()


def submit(engine, prompt, handle, max_new_tokens=10, pause_at=0, **params) -> tuple[GenerationJob, Collected]:
    sink = Collected(pause_at)
    job = GenerationJob(
        request_id=f"r{id(sink)}",
        prompt_ids=list(prompt),
        params=SamplingParams(max_new_tokens=max_new_tokens, **params),
        adapter=handle,
        sink=sink,
    )
    engine.submit(job)
    return job, sink


def reference(package: PackageFiles, name: str | None, prompt, max_new_tokens=10) -> list[int]:
    adapter = package.adapters[name] if name else None
    return genai_reference(package.root, adapter, tuple(prompt), max_new_tokens)


def test_mixed_batch_of_base_and_three_adapters_equals_genai_greedy(package, make_engine):
    engine, handles = make_engine(max_batch=len(PROMPTS) * 4 + 1, max_slots=3)
    names = [None, *sorted(handles)]
    _, first = submit(engine, PROMPTS[0], None, pause_at=1)
    first.reached.wait(WAIT_S)  # the engine waits at the first token while the others queue up
    jobs = [(name, prompt, submit(engine, prompt, handles.get(name))[1]) for prompt in PROMPTS for name in names]
    first.resume()
    assert first.wait() == reference(package, None, PROMPTS[0])
    for name, prompt, sink in jobs:
        assert sink.wait() == reference(package, name, prompt), f"adapter {name}, prompt {prompt}"
        assert sink.finish in (FinishReason.LENGTH, FinishReason.EOS)
    assert engine.scheduler.stats.max_rows == len(jobs) + 1  # they really shared the batch
    # The adapters change the output, so the test can tell them apart.
    outputs = {name: tuple(reference(package, name, PROMPTS[0])) for name in names}
    assert len(set(outputs.values())) == len(names)


def test_requests_joining_mid_flight_get_the_same_tokens(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=3)
    early = [submit(engine, PROMPTS[i], handles.get(name), max_new_tokens=16, pause_at=4)
             for i, name in enumerate([None, "alpha"])]
    early[0][1].reached.wait(WAIT_S)
    late = [submit(engine, PROMPTS[i], handles.get(name)) for i, name in ((2, "gamma"), (3, "beta"), (1, None))]
    for _, sink in early:
        sink.resume()
    for (i, name), (_, sink) in zip([(0, None), (1, "alpha")], early, strict=True):
        assert sink.wait() == reference(package, name, PROMPTS[i], 16)
    for (i, name), (_, sink) in zip([(2, "gamma"), (3, "beta"), (1, None)], late, strict=True):
        assert sink.wait() == reference(package, name, PROMPTS[i])
    stats = engine.scheduler.stats
    assert stats.prefill_runs >= 2 and stats.max_rows == 5  # joined while the early ones ran


def test_cache_growth_while_rows_run_keeps_them_exact(package, make_engine):
    """The KV cache starts at 64 positions and doubles: a long prompt joining (prefill growth) and
    rows decoding past 128 positions (decode growth) must not disturb any row."""
    engine, handles = make_engine(max_batch=4, max_slots=2)
    long_prompt = [(7 * i) % 500 + 2 for i in range(120)]
    _, short = submit(engine, PROMPTS[1], handles["beta"], max_new_tokens=80, pause_at=2)
    short.reached.wait(WAIT_S)
    _, long = submit(engine, long_prompt, handles["gamma"], max_new_tokens=24)
    short.resume()
    assert short.wait() == reference(package, "beta", PROMPTS[1], 80)
    assert long.wait() == reference(package, "gamma", long_prompt, 24)
    assert len(long.tokens) > 10
    assert engine.runner.kv.growths == 2  # 64 -> 128 at the long prefill, 128 -> 256 while decoding
    assert engine.runner.kv.capacity == 64  # back to the smallest buffers once idle


def test_a_mixed_batch_gathers_its_rows_weights_only_when_a_rows_slot_changes(package, make_engine):
    """Rows keep their adapter (and KV row) from token to token: after the first mixed decode step the
    buffers already hold every row's weights, and the steps read them without gathering again."""
    engine, handles = make_engine(max_batch=4, max_slots=3)
    _, first = submit(engine, PROMPTS[0], None, max_new_tokens=12, pause_at=1)
    first.reached.wait(WAIT_S)  # the others queue while the engine waits: all three then share the steps
    jobs = [(name, submit(engine, PROMPTS[0], handles[name], max_new_tokens=12)[1]) for name in ("alpha", "beta")]
    first.resume()
    assert first.wait() == reference(package, None, PROMPTS[0], 12)
    for name, sink in jobs:
        assert sink.wait() == reference(package, name, PROMPTS[0], 12), name
    assert engine.scheduler.stats.max_rows == 3
    assert 1 <= engine.runner.weights.gathers <= 2  # ~11 mixed decode steps; one gather (two if rows moved)


def test_a_slot_filled_with_another_adapter_is_gathered_again_for_the_rows_that_read_it(package, make_engine):
    """One adapter slot: alpha takes beta's slot while a base row keeps the batch going, at the KV row
    beta had (alpha's ranks fit in beta's: the banks are not reallocated); the buffer rows holding
    beta's weights must not serve alpha's steps."""
    engine, handles = make_engine(max_batch=4, max_slots=1)
    _, base = submit(engine, PROMPTS[0], None, max_new_tokens=24, pause_at=12)
    _, beta = submit(engine, PROMPTS[0], handles["beta"], max_new_tokens=5)
    base.reached.wait(WAIT_S)
    assert beta.wait() == reference(package, "beta", PROMPTS[0], 5)  # done while the base row ran
    gathers, generation = engine.runner.weights.gathers, engine.runner.bank.generation
    _, alpha = submit(engine, PROMPTS[0], handles["alpha"], max_new_tokens=8)
    base.resume()
    assert alpha.wait() == reference(package, "alpha", PROMPTS[0], 8)
    assert base.wait() == reference(package, None, PROMPTS[0], 24)
    assert engine.scheduler.slots.fills == 2 and engine.runner.bank.generation == generation
    assert engine.runner.weights.gathers > gathers


def test_more_adapters_than_slots_wait_for_a_slot_and_stay_exact(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=1)
    names = ["alpha", "beta", "gamma", None, "alpha"]
    jobs = [(name, submit(engine, PROMPTS[0], handles.get(name))[1]) for name in names]
    for name, sink in jobs:
        assert sink.wait() == reference(package, name, PROMPTS[0]), name
    assert engine.scheduler.stats.waits_for_slot > 0
    assert engine.scheduler.slots.fills >= 3


def test_a_request_waiting_for_a_slot_is_not_starved_by_resident_adapters(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=1)
    first_job, first = submit(engine, PROMPTS[0], handles["alpha"], max_new_tokens=12, pause_at=2)
    first.reached.wait(WAIT_S)
    waiting_job, waiting = submit(engine, PROMPTS[1], handles["beta"])  # needs alpha's slot
    later_job, later = submit(engine, PROMPTS[2], handles["alpha"])  # alpha is resident, but must queue
    first.resume()
    assert waiting.wait() == reference(package, "beta", PROMPTS[1])
    assert later.wait() == reference(package, "alpha", PROMPTS[2])
    assert first.wait() == reference(package, "alpha", PROMPTS[0], 12)
    assert waiting_job.started_at < later_job.started_at


def test_hot_replacement_keeps_the_old_version_for_running_jobs(package, make_engine):
    engine, handles = make_engine(max_batch=4, max_slots=2)
    old = handles["alpha"]
    _, running = submit(engine, PROMPTS[1], old, max_new_tokens=20, pause_at=3)
    running.reached.wait(WAIT_S)
    new = load(engine, package.root, "alpha", "2", package.adapters["gamma"])  # "retrained": other weights
    _, fresh = submit(engine, PROMPTS[1], new)
    running.resume()
    assert running.wait() == reference(package, "alpha", PROMPTS[1], 20)
    assert fresh.wait() == reference(package, "gamma", PROMPTS[1])
    engine.unload_adapter(old)  # the registry does this after the last job on it finished; returns once freed
    assert old.weights is None
    assert old not in engine.scheduler.slots.resident().values() and new in engine.scheduler.slots.resident().values()


def test_unloading_a_version_still_in_use_waits_for_its_rows(package, make_engine):
    engine, handles = make_engine(max_batch=4, max_slots=2)
    _, running = submit(engine, PROMPTS[0], handles["gamma"], max_new_tokens=12, pause_at=2)
    running.reached.wait(WAIT_S)
    # A registry bug: the engine must not pull the weights; the unload returns once the rows finished.
    unloading = threading.Thread(target=engine.unload_adapter, args=(handles["gamma"],))
    unloading.start()
    running.resume()
    assert running.wait() == reference(package, "gamma", PROMPTS[0], 12)
    unloading.join(WAIT_S)
    assert not unloading.is_alive()
    assert handles["gamma"].weights is None and handles["gamma"] not in engine.scheduler.slots.resident().values()


def test_cancel_and_stop_end_one_row_and_leave_the_others_exact(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=3)
    cancel_job, cancelled = submit(engine, PROMPTS[0], handles["beta"], max_new_tokens=40, pause_at=2)
    stop_job, stopped = submit(engine, PROMPTS[2], None, max_new_tokens=40, pause_at=3)
    _, other = submit(engine, PROMPTS[1], handles["gamma"], max_new_tokens=24)
    cancelled.reached.wait(WAIT_S)
    cancel_job.stop()
    cancelled.resume()
    stopped.reached.wait(WAIT_S)
    stop_job.stop(FinishReason.STOP)  # what the server does when a stop string matched
    stopped.resume()
    cancelled.wait()
    stopped.wait()
    assert cancelled.finish is FinishReason.CANCELLED and len(cancelled.tokens) == 2
    assert stopped.finish is FinishReason.STOP and len(stopped.tokens) == 3
    assert cancelled.tokens == reference(package, "beta", PROMPTS[0], 40)[: len(cancelled.tokens)]
    assert other.wait() == reference(package, "gamma", PROMPTS[1], 24)


def test_eos_ends_a_row_without_emitting_it_unless_ignored(package, make_engine):
    engine, _ = make_engine(max_batch=4, max_slots=1)
    expected = reference(package, None, PROMPTS[3], 10)
    engine.eos_ids = frozenset({expected[3]})  # pretend the 4th token is EOS
    _, eos = submit(engine, PROMPTS[3], None)
    _, ignoring = submit(engine, PROMPTS[3], None, ignore_eos=True)
    first = expected.index(expected[3])
    assert eos.wait() == expected[:first] and eos.finish is FinishReason.EOS
    assert ignoring.wait() == expected and ignoring.finish is FinishReason.LENGTH


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_crowd(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=3)
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7, max_new_tokens=12)
    alone = submit(engine, PROMPTS[0], handles["alpha"], **sampled)[1].wait()
    crowd = [submit(engine, p, handles.get(n)) for p, n in zip(PROMPTS, [None, "beta", "gamma", "alpha"], strict=True)]
    again = submit(engine, PROMPTS[0], handles["alpha"], **sampled)[1].wait()
    other_seed = submit(engine, PROMPTS[0], handles["alpha"], **{**sampled, "seed": 8})[1].wait()
    for _, sink in crowd:
        sink.wait()
    assert again == alone and len(alone) == 12
    assert other_seed != alone


def test_greedy_with_repetition_penalty_equals_genai(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=3)
    jobs = [(p, n, submit(engine, p, handles.get(n), max_new_tokens=16, repetition_penalty=1.3)[1])
            for p, n in zip(PROMPTS, [None, "beta", "gamma", "alpha"], strict=True)]
    plain = submit(engine, PROMPTS[0], None, max_new_tokens=16)[1]  # shares the batch, no penalty
    for prompt, name, sink in jobs:
        want = genai_reference(package.root, package.adapters.get(name), tuple(prompt), 16, repetition_penalty=1.3)
        assert sink.wait() == want, name
    assert plain.wait() == reference(package, None, PROMPTS[0], 16)
    # The penalty changes the output of the rows whose greedy tokens repeat (so equal tokens prove it applied).
    assert [n for p, n, sink in jobs if sink.tokens != reference(package, n, p, 16)]


def test_int4_package_mixed_batch_equals_genai(request, tmp_path):
    """int4 base (MatMulNBits) with float LoRA branches: the rewrite and the engine work the same."""
    from tests.fixtures.packages import TINY_SPEC

    package = package_files(Path(request.getfixturevalue("package_factory")(TINY_SPEC, precision="int4")))
    engine = BatchedEngine(Package.open(package.root), max_batch=8, max_slots=2, intra_op_threads=2)
    try:
        handles = {name: load(engine, package.root, name, "1", path) for name, path in package.adapters.items()}
        names = [None, *sorted(handles)]
        jobs = [(p, n, submit(engine, p, handles.get(n))[1]) for p in PROMPTS[:2] for n in names]
        for prompt, name, sink in jobs:
            assert sink.wait() == reference(package, name, prompt), name
    finally:
        engine.close()


def test_bad_prompts_and_unreadable_adapter_files_are_refused(package, make_engine, tmp_path):
    engine, _ = make_engine(max_batch=2, max_slots=1)
    _, nothing = submit(engine, PROMPTS[0], None, max_new_tokens=0)
    assert nothing.wait() == [] and nothing.finish is FinishReason.LENGTH
    with pytest.raises(InvalidRequest, match="empty"):
        submit(engine, [], None)
    with pytest.raises(InvalidRequest, match="shorten the prompt"):
        submit(engine, [5] * engine.max_len, None)
    bogus = tmp_path / "bogus.onnx_adapter"
    bogus.write_bytes(b"not an adapter")
    with pytest.raises(AdapterFileError, match="not an .onnx_adapter file"):
        load(engine, package.root, "bogus", "1", bogus)


def inject(engine: BatchedEngine, prompt, handle) -> tuple[GenerationJob, Collected]:
    """Queue a job past `submit`'s checks: a row the session itself fails on (an id beyond the vocab)."""
    sink = Collected()
    job = GenerationJob(request_id="bad", prompt_ids=list(prompt), params=SamplingParams(max_new_tokens=10),
                        adapter=handle, sink=sink)
    with engine._cv:
        engine._inbox.append(job)
        engine._cv.notify()
    return job, sink


def test_a_prefill_that_fails_is_rerun_row_by_row_and_ends_only_the_failing_row(package, make_engine):
    """One bad row used to fail every row of its step with INTERNAL."""
    engine, handles = make_engine(max_batch=8, max_slots=3)
    _, first = submit(engine, PROMPTS[0], None, pause_at=1)
    first.reached.wait(WAIT_S)  # the others queue up and join in one prefill
    good = [(n, p, submit(engine, p, handles[n])[1]) for p, n in zip(PROMPTS[1:], ["alpha", "beta", "gamma"],
                                                                      strict=True)]
    bad_job, bad = inject(engine, [5, engine.vocab_size + 7, 9], handles["alpha"])
    first.resume()
    assert bad.wait() == [] and bad.finish is FinishReason.CANCELLED
    assert isinstance(bad_job.error, EngineFailure) and "decoding failed" in str(bad_job.error)
    for name, prompt, sink in good:
        assert sink.wait() == reference(package, name, prompt), name
    assert first.wait() == reference(package, None, PROMPTS[0])
    assert engine.scheduler.stats.prefill_runs == 2  # first alone, then the good rows with the bad one


def test_a_decode_step_that_fails_is_rerun_row_by_row_and_ends_only_the_failing_row(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=3)
    jobs = [(n, p, *submit(engine, p, handles.get(n), max_new_tokens=12)) for p, n in
            zip(PROMPTS, [None, "alpha", "beta", "gamma"], strict=True)]
    poison = jobs[1][2]
    run = engine.runner.run

    def failing_for_poison(batch, keep=None):  # a session failure caused by one row, from its 4th token on
        rows = [r for r in batch.rows if r.job is poison]
        # a decode row's cache holds its prompt and every token but the last: 3 tokens made
        if batch.kind == "decode" and rows and rows[0].length - len(poison.prompt_ids) + 1 >= 3:
            raise RuntimeError("injected: this row breaks the session run")
        return run(batch, keep)

    engine.runner.run = failing_for_poison
    for name, prompt, job, sink in jobs:
        if job is poison:
            assert sink.wait() == reference(package, name, prompt, 12)[:3] and sink.finish is FinishReason.CANCELLED
            assert "injected" in str(job.error)
        else:
            assert sink.wait() == reference(package, name, prompt, 12), name


def guided_reference(package: PackageFiles, name: str | None, prompt, constraint, max_new_tokens=12) -> list[int]:
    """onnxruntime-genai's own greedy tokens under its guidance (set_guidance), EOS excluded."""
    import onnxruntime_genai as og

    from tests.fixtures.reference import _genai_adapters, _genai_model, _loadable

    model = _genai_model(package.root)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens, batch_size=1)
    params.set_guidance(*constraint.guidance())
    generator = og.Generator(model, params)
    if name is not None:
        key = f"guided-{name}"
        adapters = _genai_adapters(package.root)
        if key not in guided_reference.loaded:
            adapters.load(str(_loadable(package.root, package.adapters[name])), key)
            guided_reference.loaded.add(key)
        generator.set_active_adapter(adapters, key)
    generator.append_tokens(list(prompt))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token == 0:
            break
        tokens.append(token)
    return tokens


guided_reference.loaded = set()


def test_constrained_and_free_rows_share_a_batch_and_each_equals_its_reference(package, make_engine):
    """Constrained greedy rows equal onnxruntime-genai's guided greedy tokens; free rows in the same
    batch equal their reference without any constrained neighbour; sampled constrained rows match."""
    import re

    from loraplex.adapters.package.output import OutputConstraint

    constraints = [OutputConstraint("choice", ("yes", "no", "maybe so")), OutputConstraint("regex", "[0-9]{1,6}")]
    engine, handles = make_engine(max_batch=32, max_slots=3)
    engine.runner.want_guidance().result()  # loaded: the constrained rows join the free ones' batch
    names = [None, *sorted(handles)]
    _, first = submit(engine, PROMPTS[0], None, pause_at=1)
    first.reached.wait(WAIT_S)
    free = [(name, prompt, submit(engine, prompt, handles.get(name), max_new_tokens=12)[1])
            for prompt in PROMPTS[:2] for name in names]
    bound = [(name, prompt, c, submit(engine, prompt, handles.get(name), max_new_tokens=12, constraint=c)[1])
             for prompt in PROMPTS[:2] for name in names for c in constraints]
    sampled = [submit(engine, PROMPTS[2], handles.get(name), max_new_tokens=12, constraint=constraints[1],
                      temperature=1.0, seed=7)[1] for name in names]
    first.resume()
    first.wait()
    for name, prompt, sink in free:
        assert sink.wait() == reference(package, name, prompt, 12), (name, prompt)
    for name, prompt, constraint, sink in bound:
        assert sink.wait() == guided_reference(package, name, prompt, constraint), (name, prompt, constraint)
        assert sink.finish == FinishReason.STOP
    from loraplex.runtime.server.tokenizer import PackageTokenizer

    tokenizer = PackageTokenizer(package.root)
    for sink in sampled:
        assert re.fullmatch("[0-9]{1,6}", tokenizer.decode(sink.wait()))
    assert engine.scheduler.stats.max_rows == 1 + len(free) + len(bound) + len(sampled)  # one batch


def test_a_tokenizer_llguidance_cannot_read_refuses_constraints_and_serves_free_rows(package, tmp_path):
    import shutil

    from loraplex.adapters.package.output import OutputConstraint
    from loraplex.runtime.errors import ConstraintUnsupported

    copy = tmp_path / "package"
    shutil.copytree(package.root, copy)
    (copy / "tokenizer.json").write_text("{}")
    engine = BatchedEngine(Package.open(copy), intra_op_threads=2)
    digits = OutputConstraint("regex", "[0-9]+")
    try:
        first, sink = submit(engine, PROMPTS[0], None, constraint=digits)  # waits for the tokenizer, then ends
        assert sink.wait() == [] and isinstance(first.error, ConstraintUnsupported)
        assert "tokenizer" in str(first.error)
        with pytest.raises(ConstraintUnsupported, match="tokenizer"):  # known now: refused at once
            submit(engine, PROMPTS[0], None, constraint=digits)
        _, free = submit(engine, PROMPTS[0], None)
        assert free.wait() == reference(package, None, PROMPTS[0])
    finally:
        engine.close()


def test_llguidance_loads_only_when_a_request_is_constrained_and_the_first_ones_wait_for_it(package, make_engine):
    from loraplex.adapters.package.output import OutputConstraint

    engine, handles = make_engine(max_batch=4)
    assert engine.runner._guidance is None  # this package's adapters have no output contract
    assert submit(engine, PROMPTS[0], None)[1].wait() == reference(package, None, PROMPTS[0])
    assert engine.runner._guidance is None  # free requests never load it
    digits = OutputConstraint("regex", "[0-9]{1,6}")
    sinks = [submit(engine, prompt, None, max_new_tokens=12, constraint=digits)[1] for prompt in PROMPTS[:2]]
    free = submit(engine, PROMPTS[2], None)[1]
    assert free.wait() == reference(package, None, PROMPTS[2])
    for sink, prompt in zip(sinks, PROMPTS[:2], strict=True):
        assert sink.wait() == guided_reference(package, None, prompt, digits)
        assert sink.finish == FinishReason.STOP
    assert engine.runner.guidance_ready() and engine.runner.guidance_error() is None


def _adapted(bank) -> dict[str, int]:
    """Projection kind -> bank rank over the modules the bank has a rank for (e.g. {"q_proj": 4})."""
    by_kind: dict[str, set[int]] = {}
    for module, rank in bank.ranks.items():
        if rank:
            by_kind.setdefault(module.rsplit(".", 1)[-1], set()).add(rank)
    assert all(len(ranks) == 1 for ranks in by_kind.values()), by_kind  # every layer alike
    return {kind: ranks.pop() for kind, ranks in by_kind.items()}


def test_bank_slots_are_allocated_as_adapters_arrive_and_sized_to_their_ranks(package, make_engine):
    engine, handles = make_engine(max_batch=8, max_slots=8)
    bank = engine.runner.bank
    assert bank.capacity == 1 and not any(bank.ranks.values())  # only the base's slot 0, every rank 0
    assert submit(engine, PROMPTS[0], None)[1].wait() == reference(package, None, PROMPTS[0])
    assert bank.capacity == 1  # the base model needs no slot
    assert submit(engine, PROMPTS[0], handles["alpha"])[1].wait() == reference(package, "alpha", PROMPTS[0])
    assert bank.capacity == 2 and _adapted(bank) == {"q_proj": 4, "v_proj": 4}  # alpha: r=4 on q/v only
    assert handles["alpha"].weights.tensors == {}  # the slot is its only copy
    assert submit(engine, PROMPTS[1], handles["gamma"])[1].wait() == reference(package, "gamma", PROMPTS[1])
    assert bank.capacity == 3 and _adapted(bank) == {"q_proj": 4, "v_proj": 4, "gate_proj": 16, "up_proj": 16,
                                                      "down_proj": 16}
    # Exactly the slots and ranks in use: 3 slots; no bank padded to 16 where only 4 is needed.
    expected = sum(3 * spec.fixed * bank.ranks[pair.module] * 4 for pair in bank.pairs for spec in (pair.a, pair.b))
    assert bank.nbytes == expected
    # alpha still exact after the banks grew (its slot's contents were kept)
    assert submit(engine, PROMPTS[2], handles["alpha"])[1].wait() == reference(package, "alpha", PROMPTS[2])


def test_a_swapped_out_adapter_gets_back_a_compact_host_copy(package, make_engine):
    engine, handles = make_engine(max_batch=4, max_slots=1)
    alpha = handles["alpha"]
    files = read_adapter_file(package.adapters["alpha"], Package.open(package.root).lora_inputs)
    for name in ("alpha", "gamma"):
        assert submit(engine, PROMPTS[0], handles[name])[1].wait() == reference(package, name, PROMPTS[0])
    assert engine.runner.bank.owner[1] is handles["gamma"] and alpha.weights.ranks == files.ranks
    assert {n: t.shape for n, t in alpha.weights.tensors.items()} == {n: t.shape for n, t in files.tensors.items()}
    for name, tensor in files.tensors.items():
        assert (alpha.weights.tensors[name] == tensor).all(), name
    assert submit(engine, PROMPTS[1], alpha)[1].wait() == reference(package, "alpha", PROMPTS[1])


def test_edge_session_settings_keep_tokens_exact(package, make_engine):
    """`--profile edge`'s session: no arena, threads that sleep instead of spinning; the same tokens."""
    engine, handles = make_engine(max_batch=4, max_slots=2, allow_spinning=False, memory_arena=False)
    options = engine.runner.session.get_session_options()
    assert not options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    jobs = [(name, prompt, submit(engine, prompt, handles.get(name))[1])
            for name in (None, "alpha", "gamma") for prompt in PROMPTS[:2]]
    for name, prompt, sink in jobs:
        assert sink.wait() == reference(package, name, prompt), (name, prompt)


def _tell_releases(runner) -> threading.Event:
    """An event set each time the runner's idle memory release (the core's, at rest) has run."""
    released = threading.Event()
    release = runner.release_memory

    def release_and_tell() -> None:
        release()
        released.set()

    runner.release_memory = release_and_tell
    return released


def test_an_idle_engine_frees_its_kv_cache_and_the_next_requests_stay_exact(package, make_engine):
    """At rest (the core's idle release) the KV cache and the bindings over it are freed; the next
    requests make them again, the smallest, with the same tokens."""
    engine, handles = make_engine(max_batch=4, max_slots=2)
    runner = engine.runner
    released = _tell_releases(runner)
    expected = [reference(package, "alpha", prompt) for prompt in PROMPTS[:2]]
    assert [sink.wait() for sink in [submit(engine, p, handles["alpha"])[1] for p in PROMPTS[:2]]] == expected
    released.clear()
    if runner.kv.capacity:  # else the idle release came already
        assert released.wait(WAIT_S), "the idle engine did not release its memory"
    assert runner.kv.capacity == 0 and runner.kv.keys == [] and not runner._bindings
    assert [sink.wait() for sink in [submit(engine, p, handles["alpha"])[1] for p in PROMPTS[:2]]] == expected


def test_an_adapters_output_contract_loads_llguidance_at_its_first_constrained_request_not_at_start(
        package, tmp_path):
    """A package adapter with a default output contract does not make the engine load llguidance's
    tokenizer at start (its cost stays off the start and off a server at rest); its first constrained
    request loads it."""
    import json
    import shutil

    from loraplex.adapters.package.output import OutputConstraint

    root = tmp_path / "package"
    shutil.copytree(package.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["adapters"]["alpha"]["output"] = {"kind": "choice", "spec": ["yes", "no"]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    engine = BatchedEngine(Package.open(root), intra_op_threads=2, max_batch=2)
    try:
        assert engine.runner._guidance is None
        handle = load(engine, root, "alpha", "1", package.adapters["alpha"])
        choice = OutputConstraint("choice", ("yes", "no"))
        _, sink = submit(engine, PROMPTS[0], handle, max_new_tokens=4, constraint=choice)
        sink.wait()
        assert engine.runner.guidance_ready() and engine.runner.guidance_error() is None
        assert sink.finish == FinishReason.STOP
    finally:
        engine.close()


def test_an_idle_engine_gives_back_the_rank_of_an_adapter_that_left(package, make_engine):
    """gamma (rank 16 on the MLP) widens the banks; once it is unloaded, the next idle release shrinks
    them to what alpha (rank 4 on q/v) needs, and alpha stays exact."""
    engine, handles = make_engine(max_batch=4, max_slots=2)
    bank = engine.runner.bank
    released = _tell_releases(engine.runner)
    for name in ("gamma", "alpha"):
        assert submit(engine, PROMPTS[0], handles[name])[1].wait() == reference(package, name, PROMPTS[0])
    assert _adapted(bank)["gate_proj"] == 16
    wide = bank.nbytes
    engine.unload_adapter(handles["gamma"])
    assert handles["gamma"].weights is None
    released.clear()
    assert submit(engine, PROMPTS[1], handles["alpha"])[1].wait() == reference(package, "alpha", PROMPTS[1])
    assert released.wait(WAIT_S), "the idle engine did not release its memory"
    assert _adapted(bank) == {"q_proj": 4, "v_proj": 4} and bank.nbytes < wide
    assert submit(engine, PROMPTS[2], handles["alpha"])[1].wait() == reference(package, "alpha", PROMPTS[2])


def _private_pages(address: int, length: int) -> int:
    """Pages of `[address, address + length)` backed by memory of this process's own: present and
    exclusively mapped in /proc/self/pagemap (bits 63 and 56; the shared zero page is not exclusive)."""
    first, last = address // mmap.PAGESIZE, (address + length - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype="<u8")
    return int(np.count_nonzero((entries >> np.uint64(63)) & (entries >> np.uint64(56)) & np.uint64(1)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")
def test_the_base_slot_of_the_banks_takes_no_memory(package, make_engine):
    """Slot 0 (the base: zeros) is read by every base row but never written, so its whole pages stay the
    kernel's zero page, even after the banks grew (gamma, rank 16 on the MLP, then alpha: a growth that
    keeps gamma's slot) and base and adapter rows ran."""
    engine, handles = make_engine(max_batch=4, max_slots=4)
    bank = engine.runner.bank
    for name in ("gamma", "alpha", None):
        assert submit(engine, PROMPTS[0], handles[name] if name else None)[1].wait() == \
            reference(package, name, PROMPTS[0])
    assert bank.capacity == 3
    base_pages = filled_pages = 0
    for array in bank.arrays.values():
        slot = array[0].nbytes
        address = array.ctypes.data
        start, end = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE, (address + slot) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:  # slot 0's whole pages
            base_pages += (end - start) // mmap.PAGESIZE
            assert _private_pages(start, end - start) == 0
        if slot and array[1].any():
            filled_pages += _private_pages(address + slot, slot)
    assert base_pages and filled_pages  # gamma's MLP banks hold whole pages of slot 0
