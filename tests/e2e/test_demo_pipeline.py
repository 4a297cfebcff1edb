"""The demo pipeline end to end: trained demo adapters -> exported package -> gRPC server -> each
task's outputs equal PyTorch's and its eval split is answered correctly, all tasks at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraplex.v1 import generation_pb2

from tests.fixtures.serving import ENGINES, ServerThread, serving_config


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory, tiny_base: Path, demo_adapters: dict[str, Path]) -> Path:
    from loraplex.adapters.export import export_package

    out = tmp_path_factory.mktemp("demo_package") / "package"
    export_package(tiny_base, demo_adapters, out, verify=True, progress=False)
    return out


@pytest.fixture(scope="module", params=ENGINES)
def demo_server(request, demo_package: Path):
    handle = ServerThread(serving_config(demo_package, engine=request.param, max_batch=8, max_queue=64,
                                         metrics_port=None))
    yield handle
    handle.stop()


def training_record(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "training.json").read_text())


def test_served_completions_equal_the_trainers_pytorch_completions(demo_server, demo_adapters):
    compared = 0
    with demo_server.client() as client:
        # A label task's inferred output contract ends its requests with STOP (the choice complete).
        constrained = {a.name for a in client.list_adapters() if a.HasField("output")}
        assert constrained == {"sentiment"}
        for task, adapter_dir in demo_adapters.items():
            for sample in training_record(adapter_dir)["eval_samples"]:
                response = client.generate(task, sample["prompt"], max_new_tokens=32)
                if sample["correct"]:  # PyTorch stopped at EOS right after the expected completion
                    assert response.text == sample["generated"], (task, sample)
                    ended = generation_pb2.STOP if task in constrained else generation_pb2.EOS
                    assert response.finish_reason == ended
                else:  # PyTorch's budget may have cut its text short
                    assert response.text.startswith(sample["generated"]), (task, sample)
                compared += 1
    assert compared >= 3 * len(demo_adapters)


def test_concurrent_task_clients_answer_their_eval_split(demo_server, demo_adapters):
    from loraplex.runtime.app.demo import eval_examples, query_all
    from loraplex.trainer.config import TaskConfig

    examples = {
        task: eval_examples(TaskConfig.from_dict(training_record(d)["config"])) for task, d in demo_adapters.items()
    }
    rows = demo_server.call(query_all(demo_server.target, examples))
    assert [r for r in rows if r.failed] == []
    for task in demo_adapters:
        mine = [r for r in rows if r.task == task]
        assert len(mine) == len(examples[task]) > 0
        accuracy = sum(r.correct for r in mine) / len(mine)
        trained = training_record(demo_adapters[task])["eval_exact_match"]
        assert accuracy >= min(0.9, trained), (task, accuracy, trained)


def test_adapter_outputs_differ_from_the_base_model(demo_server, demo_adapters):
    with demo_server.client() as client:
        for task, adapter_dir in demo_adapters.items():
            sample = training_record(adapter_dir)["eval_samples"][0]
            tuned = client.generate(task, sample["prompt"], max_new_tokens=8).text
            base = client.generate("", sample["prompt"], max_new_tokens=8).text
            assert tuned != base, task


def test_demo_hot_swap_under_load_fails_no_request(demo_server, demo_adapters, demo_package):
    """The demo's swap step against this server: replace one task's adapter while all tasks send."""
    from loraplex.runtime.app.demo import SWAPPED_TASK, eval_examples, swap_under_load
    from loraplex.runtime.client import AsyncClient
    from loraplex.trainer.config import TaskConfig

    if SWAPPED_TASK not in demo_adapters:
        pytest.skip(f"demo_adapters has no {SWAPPED_TASK}")
    examples = {
        task: eval_examples(TaskConfig.from_dict(training_record(d)["config"]))[:4] for task, d in demo_adapters.items()
    }

    async def swap() -> str:  # the same trained weights under a new version: outputs must not change
        async with AsyncClient(demo_server.target) as admin:
            info = await admin.load_adapter(SWAPPED_TASK, f"{SWAPPED_TASK}.onnx_adapter", version="2")
            return info.version

    rows = demo_server.call(swap_under_load(demo_server.target, examples, swap), timeout=300)
    assert [r for r in rows if r.failed] == []
    versions = [r.version for r in rows if r.task == SWAPPED_TASK]
    assert versions[-1] == "2" and len(set(versions)) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_ignore_eos_decodes_past_eos_on_every_engine(demo_package, demo_adapters, engine):
    """Benchmarks ask every request to do the same work: `ignore_eos` keeps decoding to the budget."""
    handle = ServerThread(serving_config(demo_package, engine=engine, metrics_port=None))
    try:
        with handle.client() as client:
            for task, adapter_dir in demo_adapters.items():
                sample = next(s for s in training_record(adapter_dir)["eval_samples"] if s["correct"])
                # Free text (no output contract: a complete contract ends the request whatever ignore_eos says).
                stopped = client.generate(task, sample["prompt"], max_new_tokens=16, no_default_output=True)
                assert stopped.finish_reason == generation_pb2.EOS and len(stopped.token_ids) < 16
                full = client.generate(task, sample["prompt"], max_new_tokens=16, ignore_eos=True,
                                       no_default_output=True)
                assert full.finish_reason == generation_pb2.LENGTH, task
                assert len(full.token_ids) == full.usage.completion_tokens == 16
                assert list(full.token_ids[: len(stopped.token_ids)]) == list(stopped.token_ids)
    finally:
        handle.stop()


def test_model_info_and_list_show_the_accuracy_export_verified(demo_server, demo_package, demo_adapters):
    from loraplex.adapters.package.manifest import Manifest

    manifest = Manifest.load(demo_package)
    with demo_server.client() as client:
        info, listed = client.model_info(), {a.name: a for a in client.list_adapters()}
    for task, entry in manifest.adapters.items():
        verified = entry.accuracy
        assert verified is not None and verified.passed and verified.engine == "batched"
        # judged by the metric training selected the adapter by, exact match recorded beside it
        assert verified.metric == training_record(demo_adapters[task])["metric"]
        assert "exact_match" in verified.package
        metric = verified.metric
        for shown in (info.accuracy[task], listed[task].accuracy):
            assert (shown.metric, shown.examples, shown.precision) == (metric, verified.examples, "fp32")
            assert shown.package == verified.package[metric] == verified.pytorch[metric]
            assert shown.base == verified.base[metric] < shown.package


def test_the_demo_reports_parseable_outputs_with_and_without_the_contract(demo_server, demo_adapters, demo_package):
    """Sampled hot, every output of the sentiment adapter is a label under its inferred contract."""
    from loraplex.adapters.package.manifest import Manifest
    from loraplex.runtime.api import LLM
    from loraplex.runtime.app.demo import MAX_NEW_TOKENS, eval_examples, parseable_rates
    from loraplex.trainer.config import TaskConfig

    examples = {task: eval_examples(TaskConfig.from_dict(training_record(d)["config"]))[:12]
                for task, d in demo_adapters.items()}
    rates = demo_server.call(parseable_rates(demo_server.target, examples))
    assert set(rates) == {"sentiment"}
    constrained, free, count = rates["sentiment"]
    assert constrained == 1.0 and count == 12
    # Free, the rate is whatever these seeded draws give: the same draws in process, one at a time as the
    # demo sends them, on the same engine, counted against the adapter's labels.
    labels = set(Manifest.load(demo_package).adapters["sentiment"].output["spec"])
    with LLM(demo_package, engine=demo_server.running.config.engine) as llm:
        texts = [llm.generate(inputs=example.fields, adapter="sentiment", max_new_tokens=MAX_NEW_TOKENS,
                              temperature=1.5, seed=i, no_default_output=True).text
                 for i, example in enumerate(examples["sentiment"])]
    assert free == sum(text in labels for text in texts) / count


def test_the_readmes_in_process_example_runs_on_the_demo_package(demo_package: Path, tmp_path: Path, capsys):
    """The README's `LLM` example, as written, with the demo package's path: it must keep working."""
    import re
    import shutil

    from loraplex.runtime.api import FinishReason

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## In process, without a server"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    other = shutil.copy(demo_package / "adapters" / "sentiment.onnx_adapter", tmp_path / "other.onnx_adapter")
    example = example.replace("artifacts/demo/package", str(demo_package)).replace("path/to/other.onnx_adapter",
                                                                                 str(other))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    reply, replies = namespace["reply"], namespace["replies"]
    assert reply.finish_reason is FinishReason.STOP and reply.text.strip() in {"positive", "negative"}
    assert len(replies) == 2 and all(r.adapter == "reverse" for r in replies)
    assert capsys.readouterr().out.startswith(f"{reply.text} {reply.finish_reason} {reply.token_ids}\n")


def test_classify_ranks_first_the_greedy_label_on_every_eval_example(demo_server, demo_adapters):
    """The demo's sentiment task (a label contract): Classify's top label is the label greedy Generate
    returns, on every held-out example, and its probabilities sum to 1."""
    from loraplex.runtime.app.demo import eval_examples
    from loraplex.trainer.config import TaskConfig

    config = TaskConfig.from_dict(training_record(demo_adapters["sentiment"])["config"])
    examples = eval_examples(config)
    assert examples
    with demo_server.client() as client:
        for example in examples:
            result = client.classify("sentiment", inputs=example.fields)
            assert abs(sum(x.probability for x in result.labels) - 1) < 1e-9
            greedy = client.generate("sentiment", inputs=example.fields, max_new_tokens=16)
            assert result.labels[0].label == greedy.text, example
