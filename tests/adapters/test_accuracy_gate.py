"""Export's task-accuracy gate, from the command line: `--max-accuracy-drop`, `--eval-data`, `--eval-examples`.

The demo's trained sentiment adapter answers its held-out reviews right in PyTorch (its training
recorded 100% accuracy on them). Declaring an output contract whose choices are not its labels
makes the package worse by construction: the package decodes under the contract, as the server
will, so it can only answer " good" or " bad" and never a label (0%), while PyTorch, the
reference, decodes free (100%). The export must then fail naming the adapter and both numbers,
and leave no manifest.json: a package that lost its accuracy is never a package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from loraplex.adapters.package.manifest import MANIFEST_NAME, Manifest
from loraplex.runtime.app.cli import main

EXAMPLES = 8  # --eval-examples: enough for an exact share, few enough to keep each export short
WRONG_CHOICES = [" good", " bad"]  # not the sentiment labels (" positive", " negative")


@pytest.fixture(scope="module")
def sentiment(demo_adapters: dict[str, Path]) -> Path:
    return demo_adapters["sentiment"]


@pytest.fixture(scope="module")
def held_out(sentiment: Path, tmp_path_factory) -> Path:
    """The first EXAMPLES records the sentiment training held out, as an --eval-data file."""
    from loraplex.trainer.dataset import held_out_records

    config = json.loads((sentiment / "training.json").read_text())["config"]
    records = held_out_records(config["data"], config["eval_split"], config["seed"])[:EXAMPLES]
    path = tmp_path_factory.mktemp("eval_data") / "sentiment.eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _with_output(adapter: Path, output: dict, into: Path) -> Path:
    """A copy of `adapter` whose training.json records `output` as its output contract."""
    copy = shutil.copytree(adapter, into)
    training = json.loads((copy / "training.json").read_text())
    training["output"] = output
    (copy / "training.json").write_text(json.dumps(training))
    return copy


def test_the_three_flags_reach_the_manifest(tiny_base, sentiment, held_out, tmp_path):
    """--eval-data is the source, --eval-examples the count, --max-accuracy-drop the allowed drop (0 here:
    an fp32 package on the batched engine answers exactly as PyTorch does)."""
    trained = json.loads((sentiment / "training.json").read_text())
    assert trained["metric"] == "accuracy" and trained["eval_metrics"]["accuracy"] == 1.0  # the premise
    out = tmp_path / "pkg"
    assert main(["export", "--base", str(tiny_base), "--adapter", f"sentiment={sentiment}", "--out", str(out),
                 "--eval-data", f"sentiment={held_out}", "--eval-examples", str(EXAMPLES),
                 "--max-accuracy-drop", "0"]) == 0
    accuracy = Manifest.load(out).adapters["sentiment"].accuracy
    assert (accuracy.source, accuracy.examples, accuracy.max_drop) == (str(held_out), EXAMPLES, 0.0)
    assert (accuracy.metric, accuracy.engine, accuracy.passed) == ("accuracy", "batched", True)
    assert accuracy.pytorch["accuracy"] == accuracy.package["accuracy"] == 1.0
    assert accuracy.token_agreement == 1.0


def test_an_export_that_loses_accuracy_fails_naming_the_adapter_and_both_numbers(
        tiny_base, sentiment, held_out, tmp_path, capsys):
    bad = _with_output(sentiment, {"kind": "choice", "spec": WRONG_CHOICES}, tmp_path / "sentiment")
    out = tmp_path / "pkg"
    # 50 points allowed: the drop (100 points) is over it; the message shows the flag's value
    assert main(["export", "--base", str(tiny_base), "--adapter", f"sentiment={bad}", "--out", str(out),
                 "--eval-data", f"sentiment={held_out}", "--eval-examples", str(EXAMPLES),
                 "--max-accuracy-drop", "50"]) == 2
    err = capsys.readouterr().err
    assert (f"loraplex export: error: adapter 'sentiment' loses task accuracy in the fp32 package: accuracy "
            f"0.0% vs 100.0% in PyTorch fp32 on {EXAMPLES} examples ({held_out}), a drop of 100.0% > 50.0%; "
            "fixes: ") in err
    assert not (out / MANIFEST_NAME).exists()  # nothing a server could open
    assert (out / ".export-incomplete").is_file()


def test_the_api_raises_accuracy_error_and_a_drop_within_the_allowance_passes(tiny_base, sentiment, held_out,
                                                                               tmp_path):
    """The same loss through `export_package`: AccuracyError; allowed all 100 points, the package is
    written and its manifest records the loss it was allowed."""
    from loraplex.adapters.export import export_package
    from loraplex.adapters.export.accuracy import AccuracyError
    from loraplex.adapters.export.verify import Verification

    wrong = {"sentiment": {"kind": "choice", "spec": WRONG_CHOICES}}
    strict = Verification(eval_data={"sentiment": held_out}, eval_examples=EXAMPLES)  # the default 2 points
    with pytest.raises(AccuracyError, match=r"^adapter 'sentiment' loses task accuracy in the fp32 package: "
                       rf"accuracy 0\.0% vs 100\.0% in PyTorch fp32 on {EXAMPLES} examples .* > 2\.0%"):
        export_package(tiny_base, {"sentiment": sentiment}, tmp_path / "strict", verification=strict,
                       outputs=wrong, progress=False)
    assert not (tmp_path / "strict" / MANIFEST_NAME).exists()
    lenient = Verification(eval_data={"sentiment": held_out}, eval_examples=EXAMPLES, max_accuracy_drop=1.0)
    manifest = export_package(tiny_base, {"sentiment": sentiment}, tmp_path / "lenient", verification=lenient,
                              outputs=wrong, progress=False)
    accuracy = Manifest.load(tmp_path / "lenient").adapters["sentiment"].accuracy
    assert accuracy == manifest.adapters["sentiment"].accuracy
    assert (accuracy.pytorch["accuracy"], accuracy.package["accuracy"], accuracy.drop) == (1.0, 0.0, 1.0)
    assert accuracy.passed and accuracy.max_drop == 1.0
