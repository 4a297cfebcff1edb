"""One client can never hurt another. A request that fails ends alone, with INTERNAL, and
leaves nothing behind: no lease, no in-flight count, no generator holding its adapter.

(The batched engine's row-by-row rerun of a failed step is tested at the engine level in
test_batched_engine.py.)
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from loraplex.adapters.package.adapter_file import read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams

from tests.fixtures.serving import wait_until


class PoisonedSink:
    """A request layer that breaks at the job's `at`-th token (what a bug in it would do)."""

    def __init__(self, sink, at: int):
        self._sink, self._at, self._seen = sink, at, 0

    def on_output(self, output) -> None:
        self._seen += len(output.tokens)
        if output.tokens and self._seen >= self._at:
            raise RuntimeError("injected: the sink of this request broke")
        self._sink.on_output(output)


class PoisoningEngine:
    """Submits to the server's real engine; the job with request id `poisoned` gets a breaking sink."""

    def __init__(self, engine, poisoned: str, at: int):
        self._engine, self._poisoned, self._at = engine, poisoned, at

    def submit(self, job) -> None:
        if job.request_id == self._poisoned:
            job.sink = PoisonedSink(job.sink, self._at)
        self._engine.submit(job)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def test_a_failing_request_ends_alone_and_leaves_no_lease_or_busy_adapter(server_factory, adapter_root, caplog):
    server = server_factory(adapter_root=adapter_root, max_batch=8, metrics_port=None)
    service, registry = server.running.service, server.running.registry
    prompts = [("alpha", "The weather today"), ("beta", "Review: fine"), ("gamma", "Translate: cat"), ("", "hello")]
    with server.client() as client:
        client.load_adapter("delta", "beta.onnx_adapter")
        want = {(a, p): list(client.generate(a, p, max_new_tokens=12).token_ids) for a, p in prompts}
        service.engine = PoisoningEngine(service.engine, "poisoned", at=3)
        try:
            with ThreadPoolExecutor(len(prompts) * 2 + 1) as pool:
                poisoned = pool.submit(client.generate, "delta", "The weather today", max_new_tokens=12,
                                       request_id="poisoned")
                others = [(a, p, pool.submit(client.generate, a, p, max_new_tokens=12)) for a, p in prompts * 2]
                with pytest.raises(grpc.RpcError) as err:
                    poisoned.result(60)
                assert err.value.code() == grpc.StatusCode.INTERNAL and "poisoned" in err.value.details()
                for adapter, prompt, future in others:
                    assert list(future.result(60).token_ids) == want[(adapter, prompt)]
        finally:
            service.engine = service.engine._engine
        wait_until(lambda: service.in_flight == 0, what="no request in flight")
        assert all(v.leases == 0 for v in registry.versions())
        caplog.set_level(logging.ERROR)
        assert client.unload_adapter("delta").name == "delta"  # waits for the engine to free it
        assert not [r for r in caplog.records if "unloading adapter" in r.getMessage()]
        assert client.health() == "SERVING"


class _Sink:
    def __init__(self):
        self.done = threading.Event()
        self.finish = None

    def on_output(self, output):
        if output.finish is not None:
            self.finish = output.finish
            self.done.set()


def test_genai_job_that_fails_to_start_does_not_keep_its_adapter_in_use(recipe_package):
    """Defect 7: the failed job kept its exception, whose traceback kept the generator, which kept the
    adapter: the next Unload failed with "Adapter still in use" while the registry said unloaded."""
    from loraplex.runtime.engines.genai import GenaiEngine

    package = Package.open(recipe_package)
    engine = GenaiEngine(package, max_batch=2)
    try:
        weights = read_adapter_file(package.adapter_path("alpha"), package.lora_inputs)
        handle = engine.load_adapter("alpha", "1", weights)
        sink = _Sink()
        # Past submit's checks: an id beyond the vocabulary makes onnxruntime-genai fail in append_tokens,
        # after the generator was made and its adapter bound.
        job = GenerationJob("doomed", [5, package.config.vocab_size + 7], SamplingParams(max_new_tokens=4), handle,
                            sink)
        with engine._cv:  # past submit, into the engine's inbox
            engine._inbox.append(job)
            engine._cv.notify()
        assert sink.done.wait(60) and sink.finish is FinishReason.CANCELLED
        assert "out of" in str(job.error) or "bounds" in str(job.error), job.error
        engine.unload_adapter(handle)  # raised "Adapter still in use" while `job` was alive
    finally:
        engine.close()
