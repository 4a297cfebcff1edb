"""The in-process API (`loraplex.runtime.api.LLM`) on both engines: the same tokens as a gRPC request to
a server on the same package, the same refusals, streaming with cancel, async use, adapter loads."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import grpc
import pytest
from loraplex.runtime.api import LLM, Chunk
from loraplex.runtime.engines.base import FinishReason
from loraplex.runtime.errors import AdapterNotFound, InvalidRequest

from tests.fixtures.serving import ENGINES, ServerThread, serving_config, wait_until

PROMPTS = ["The weather today", "Review: fine", "Translate: cat", "hello"]


@pytest.fixture(scope="module", params=ENGINES)
def llm(request, recipe_package: Path):
    with LLM(recipe_package, engine=request.param, max_batch=4, max_queue=16) as handle:
        yield handle


@pytest.fixture(scope="module")
def grpc_server(llm, recipe_package: Path):
    server = ServerThread(serving_config(recipe_package, engine=llm.config.engine, metrics_port=None))
    yield server
    server.stop()


@pytest.mark.parametrize("adapter", ["", "alpha", "beta", "gamma"])
def test_generate_in_process_equals_a_grpc_request(llm, grpc_server, adapter):
    with grpc_server.client() as client:
        want = [client.generate(adapter, p, max_new_tokens=12) for p in PROMPTS]
    got = llm.generate(PROMPTS, adapter=adapter, max_new_tokens=12)  # all at once: one batch
    assert [g.token_ids for g in got] == [list(w.token_ids) for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.adapter == adapter and g.prompt_tokens == w.usage.prompt_tokens for g, w in zip(got, want,
                                                                                                   strict=True))
    one = llm.generate(PROMPTS[0], adapter=adapter, max_new_tokens=12)
    assert one.token_ids == got[0].token_ids and one.adapter_version == got[0].adapter_version


def test_task_inputs_render_through_the_adapters_template(llm, grpc_server):
    fields = {"text": "a fine film"}
    with grpc_server.client() as client:
        want = client.generate("alpha", inputs=fields, max_new_tokens=6)
    assert llm.generate(inputs=fields, adapter="alpha", max_new_tokens=6).token_ids == list(want.token_ids)
    assert llm.tokenize(inputs=fields, adapter="alpha") == llm.tokenizer.encode("Review: a fine film\nSentiment:")


def test_refusals_are_the_servers_errors(llm, grpc_server):
    with pytest.raises(InvalidRequest, match="temperature is 500") as refused:
        llm.generate("hi", temperature=500)
    assert refused.value.field == "temperature"
    with pytest.raises(AdapterNotFound, match="alpha, beta, gamma"):
        llm.generate("hi", adapter="nope")
    with pytest.raises(InvalidRequest, match="max-prompt-bytes"):
        llm.generate("word " * (16 * llm.package.config.context_length))
    with pytest.raises(InvalidRequest, match="context length is"):
        llm.generate("word " * (llm.package.config.context_length + 10))
    with grpc_server.client() as client, pytest.raises(grpc.RpcError) as over_grpc:
        client.generate("", "word " * (llm.package.config.context_length + 10))
    assert over_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="either prompt"):
        llm.generate()


def test_stream_yields_the_reply_in_pieces_and_a_finish(llm):
    whole = llm.generate(PROMPTS[1], adapter="beta", max_new_tokens=10, ignore_eos=True)
    chunks = list(llm.stream(PROMPTS[1], adapter="beta", max_new_tokens=10, ignore_eos=True))
    assert chunks[-1] == Chunk(finish_reason=FinishReason.LENGTH)
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids


class PausingEngine:
    """The service's engine, with each job's engine thread held after its first output until `resume`."""

    def __init__(self, engine):
        self._engine, self.resume = engine, threading.Event()

    def submit(self, job) -> None:
        sink, resume = job.sink, self.resume

        class Pausing:
            def on_output(self, output):
                sink.on_output(output)
                if output.tokens:
                    assert resume.wait(60), "the test never resumed the engine"

        job.sink = Pausing()
        self._engine.submit(job)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def test_leaving_a_stream_early_cancels_its_request(llm):
    service = llm._core.service
    cancelled = llm.metrics.requests.labels("", "CANCELLED").get()
    service.engine = paused = PausingEngine(service.engine)
    try:
        stream = llm.stream(PROMPTS[0], max_new_tokens=400, ignore_eos=True)
        assert next(stream).token_ids  # the engine now waits after this job's first token
        stream.close()  # the caller stops reading
        wait_until(lambda: llm.metrics.requests.labels("", "CANCELLED").get() == cancelled + 1,
                   what="the request cancelled")
        assert service.in_flight == 1  # its engine job is still held
    finally:
        paused.resume.set()
        service.engine = paused._engine
    assert llm._call(service.wait_idle(30)) and service.in_flight == 0


def test_async_calls_run_on_the_callers_loop(llm):
    async def main():
        replies = await asyncio.gather(*(llm.agenerate(p, adapter="gamma", max_new_tokens=8) for p in PROMPTS))
        chunks = [c async for c in llm.astream(PROMPTS[2], adapter="gamma", max_new_tokens=8)]
        return replies, chunks

    replies, chunks = asyncio.run(main())
    assert [r.token_ids for r in replies] == [r.token_ids for r in llm.generate(PROMPTS, adapter="gamma",
                                                                                 max_new_tokens=8)]
    assert [t for c in chunks for t in c.token_ids] == replies[2].token_ids


def test_adapters_load_replace_and_unload(llm, tmp_path: Path, recipe_package: Path):
    copy = shutil.copy(recipe_package / "adapters" / "beta.onnx_adapter", tmp_path / "beta.onnx_adapter")
    version = llm.load_adapter("delta", copy, version="v2")
    assert version == "v2" and "delta" in llm.adapters()
    want = llm.generate(PROMPTS[0], adapter="beta", max_new_tokens=8).token_ids
    assert llm.generate(PROMPTS[0], adapter="delta", max_new_tokens=8).token_ids == want
    llm.unload_adapter("delta")
    with pytest.raises(AdapterNotFound):
        llm.generate(PROMPTS[0], adapter="delta")
