"""`loraplex adapters merge` (torch tier): PEFT's add_weighted_adapter written as a PEFT adapter that
records its sources; a `cat` merge added to a package serves the tokens of the same weighted mix."""

from __future__ import annotations

import json
import shutil

import pytest
from loraplex.adapters.export.merge import MergeSource, merge_adapters
from loraplex.adapters.package.manifest import Manifest
from loraplex.runtime.app.cli import main

from tests.fixtures.packages import TINY_SPEC, TINY_TEMPLATES

PROMPTS = ("the quick brown fox", "Review: fine\nSentiment:")


@pytest.fixture
def sources(tiny_base, random_adapter_factory):
    return {name: random_adapter_factory(tiny_base, name, rank, targets, seed, template=TINY_TEMPLATES[name])
            for name, rank, targets, seed in TINY_SPEC}


def test_cat_merge_serves_as_the_mix(tiny_base, tiny_package, sources, tmp_path):
    from loraplex.runtime.api import LLM

    package = shutil.copytree(tiny_package, tmp_path / "package")
    out = tmp_path / "merged"
    mix = [("alpha", 0.7), ("gamma", -0.6)]
    assert main(["adapters", "merge", "--adapter", f"alpha={sources['alpha']}", "--adapter",
                 f"gamma={sources['gamma']}", "--weight", "0.7", "--weight", "-0.6", "--out", str(out),
                 "--add-to", str(package)]) == 0
    record = json.loads((out / "training.json").read_text())["merge"]
    assert record["combination"] == "cat"
    assert [(s["name"], s["weight"]) for s in record["sources"]] == mix
    assert all(len(s["sha256"]) == 64 for s in record["sources"])
    entry = Manifest.load(package).adapters["merged"]
    assert entry.parity.passed and entry.rank == 4 + 16
    assert entry.training["merge"] == record
    with LLM(package, engine="batched", max_batch=4) as llm:
        for prompt in PROMPTS:
            merged = llm.generate(prompt, adapter="merged", max_new_tokens=8, ignore_eos=True, logprobs=0,
                                  no_default_output=True)
            mixed = llm.generate(prompt, mix=mix, max_new_tokens=8, ignore_eos=True, logprobs=0)
            assert merged.token_ids == mixed.token_ids
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(merged.logprobs, mixed.logprobs,
                                                                          strict=True))


@pytest.mark.parametrize("combination, density", [("ties", 0.5), ("dare_linear", 0.7)])
def test_task_arithmetic_merges_record_their_sources(tiny_base, sources, tmp_path, random_adapter_factory,
                                                     combination, density):
    from safetensors.numpy import load_file

    other = random_adapter_factory(tiny_base, "alpha2", 4, ("q_proj", "v_proj"), 11)
    out = merge_adapters(tiny_base, [MergeSource("alpha", sources["alpha"], 0.6), MergeSource("alpha2", other, 0.4)],
                         tmp_path / "m", combination=combination, density=density)
    record = json.loads((out / "training.json").read_text())
    assert record["merge"]["density"] == density
    assert "template" not in record  # the sources' templates differ: none carries over
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(t.shape[0] == 4 or t.shape[1] == 4 for t in tensors.values())


def test_merge_refusals(tiny_base, sources, tmp_path):
    both = ["--adapter", f"alpha={sources['alpha']}", "--adapter", f"gamma={sources['gamma']}"]
    base = ["--base", str(tiny_base)]
    assert main(["adapters", "merge", *both, *base, "--combination", "linear", "--out", str(tmp_path / "a")]) == 2
    assert main(["adapters", "merge", *both, *base, "--combination", "ties", "--out", str(tmp_path / "b")]) == 2
    assert main(["adapters", "merge", *both, *base, "--weight", "1", "--out", str(tmp_path / "c")]) == 2
    assert main(["adapters", "merge", *both, "--out", str(tmp_path / "d")]) == 2  # no base


def test_a_merge_is_scored_on_each_source_tasks_held_out_examples(tiny_base, sources, tmp_path, capsys):
    alpha_data = tmp_path / "alpha.jsonl"
    alpha_data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in
                                  [("great", "positive"), ("dull", "negative"), ("fine", "positive")]))
    gamma_data = tmp_path / "gamma.jsonl"
    gamma_data.write_text("".join(json.dumps({"word": w, "french": f}) + "\n" for w, f in
                                  [("cat", "chat"), ("dog", "chien")]))
    # One source at weight 1: the merge is that adapter, so both score alike on every prediction.
    alone = merge_adapters(tiny_base, [MergeSource("alpha", sources["alpha"], 1.0)], tmp_path / "one",
                           eval_data={"alpha": alpha_data})
    scores = json.loads((alone / "training.json").read_text())["merge"]["sources"][0]["accuracy"]
    assert scores["examples"] == 3 and scores["metric"] == "exact_match"
    assert scores["merged"] == scores["source"] and scores["agreement"] == 1.0
    assert main(["adapters", "merge", "--base", str(tiny_base), "--adapter", f"alpha={sources['alpha']}",
                 "--adapter", f"gamma={sources['gamma']}", "--adapter", f"beta={sources['beta']}",
                 "--out", str(tmp_path / "three"), "--eval-data", f"alpha={alpha_data}",
                 "--eval-data", f"gamma={gamma_data}"]) == 0
    printed = capsys.readouterr().out
    assert "alpha task (3 held-out examples, exact_match)" in printed
    assert "gamma task (2 held-out examples" in printed and "beta: no held-out examples" in printed
    record = json.loads((tmp_path / "three" / "training.json").read_text())["merge"]["sources"]
    assert [s["accuracy"] is None for s in record] == [False, False, True]
    assert record[0]["accuracy"]["agreement"] < 1.0  # three tasks in one adapter: alpha's answers move
