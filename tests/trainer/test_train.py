"""Real training runs: the demo acceptance figures, the adapter format, resume, early stopping, the CLI."""

import dataclasses
import json
import math

import pytest
from loraplex.trainer.base_model import base_identity, load_base_model
from loraplex.trainer.config import TaskConfig
from loraplex.trainer.demo_tasks import DATA_DIR

from tests.trainer.conftest import SENTIMENT


def test_demo_adapters_reach_the_acceptance_accuracy(demo_training):
    figures = {
        task: (r.training["eval_exact_match"], r.training["base_eval_exact_match"], r.training["wall_time_s"])
        for task, r in demo_training.items()
    }
    print("\ntask: (adapter exact match, base exact match, seconds)", figures)
    assert set(figures) == {"sentiment", "reverse", "translate"}
    for task, (adapter_em, base_em, _) in figures.items():
        assert adapter_em >= 0.9, f"{task}: adapter exact match {adapter_em:.1%} < 90%"
        assert base_em < 0.2, f"{task}: base model exact match {base_em:.1%} >= 20%"


def test_training_json_records_template_base_options_and_curves(demo_training, tiny_base):
    result = demo_training["sentiment"]
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= files
    assert "checkpoints" not in files
    training = json.loads((result.adapter_dir / "training.json").read_text())
    assert training == json.loads(json.dumps(result.training))
    assert training["template"] == {"prompt": "Review: {text}\nSentiment:", "completion": " {label}"}
    assert training["base"] == base_identity(tiny_base)
    assert TaskConfig.from_dict(training["config"]).rank == 8
    assert training["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]  # fmt: skip
    assert training["data"] == {"path": str(DATA_DIR / "sentiment.jsonl"), "records": 400, "train_records": 360,
                                "eval_records": 40}  # fmt: skip
    steps = training["steps"]
    assert [s for s, _ in training["train_loss"]] == list(range(1, steps + 1))
    assert training["train_loss"][-1][1] < training["train_loss"][0][1]
    assert [s for s, _ in training["eval_loss"]] == list(range(23, steps + 1, 23))  # once per epoch of 23 steps
    assert training["eval_perplexity"] == pytest.approx(math.exp(training["final_eval_loss"]), rel=1e-5)
    kept = dict(training["eval_loss"])[training["best_step"]]
    assert training["final_eval_loss"] == pytest.approx(kept, rel=1e-4)  # the kept evaluation's weights
    # A label task, inferred: scored by accuracy, with and without the adapter; the curve per evaluation.
    assert (training["task_kind"], training["metric"]) == ("classification", "accuracy")
    # ... so its output contract is a choice of its labels, as the template renders them.
    assert training["output"] == {"kind": "choice", "spec": [" negative", " positive"]}
    assert list(training["eval_metrics"]) == ["accuracy", "macro_f1", "exact_match", "perplexity"]
    assert training["eval_metrics"]["accuracy"] == 1.0 and training["base_eval_metrics"]["accuracy"] == 0.0
    assert [s for s, _ in training["eval_metric_curve"]] == [s for s, _ in training["eval_loss"]]
    assert training["metric_sample"] == {"records": 40, "of": 40}
    assert (training["stop_reason"], training["plateaued"]) == ("early_stopping", True)
    assert (result.adapter_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generation = demo_training["reverse"].training
    assert (generation["task_kind"], generation["metric"]) == ("generation", "rouge_l")
    assert generation["output"] is None  # free text: no contract
    assert list(generation["eval_metrics"]) == ["rouge_l", "bleu", "exact_match", "perplexity"]


def test_adapter_loads_with_peft_and_generates_its_completions(demo_training, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    for task in ("reverse", "translate"):
        result = demo_training[task]
        config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), result.adapter_dir)
        samples = [s for s in result.training["eval_samples"] if s["correct"]]
        assert len(samples) >= 4
        for sample in samples:
            ids = tokenizer(sample["prompt"], return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1] :])
            assert text.startswith(sample["expected"] + tokenizer.eos_token), (task, sample, text)


def test_resume_from_checkpoint_gives_the_uninterrupted_result(loaded_base, tiny_base, small_data, tmp_path):
    from loraplex.trainer.train import train_task
    from safetensors.torch import load_file

    model, tokenizer = loaded_base
    identity = base_identity(tiny_base)
    options = dict(task="s", data=small_data, **SENTIMENT, max_steps=8, batch_size=8, dropout=0.1,
                   eval_steps=2, checkpoint_every=3, learning_rate=0.01, seed=3)  # fmt: skip
    straight = train_task(model, tokenizer, TaskConfig(**options, out=tmp_path / "a"), identity, progress=False)

    class Crash(Exception):
        pass

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash

    interrupted = TaskConfig(**options, out=tmp_path / "b")
    with pytest.raises(Crash):
        train_task(model, tokenizer, interrupted, identity, progress=False, on_step=crash_at_5)
    assert [p.name for p in interrupted.checkpoint_dir.iterdir()] == ["step-000003.pt"]
    steps_run = []
    resumed = train_task(model, tokenizer, dataclasses.replace(interrupted, resume=True), identity, progress=False,
                         on_step=lambda step, loss: steps_run.append(step))  # fmt: skip
    assert steps_run == [4, 5, 6, 7, 8]
    assert not interrupted.checkpoint_dir.exists()  # a finished run leaves no checkpoints behind
    for key in ("train_loss", "eval_loss", "final_eval_loss", "best_step"):
        assert resumed.training[key] == straight.training[key], key
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    # The base is left as it was found: no LoRA layers, weights unchanged.
    fresh, _ = load_base_model(tiny_base)
    assert not [n for n, _ in model.named_modules() if "lora" in n]
    assert all((p == q).all() for p, q in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))


def test_resume_refuses_a_checkpoint_of_other_options(loaded_base, tiny_base, small_data, tmp_path):
    from loraplex.trainer.config import ConfigError
    from loraplex.trainer.train import train_task

    model, tokenizer = loaded_base
    config = TaskConfig(task="s", data=small_data, **SENTIMENT, out=tmp_path, max_steps=4, checkpoint_every=1)

    def stop(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_task(model, tokenizer, config, base_identity(tiny_base), progress=False, on_step=stop)
    with pytest.raises(ConfigError, match=r"step-000001.pt was written with rank=8 but this run has rank=4"):
        again = dataclasses.replace(config, resume=True, rank=4)
        train_task(model, tokenizer, again, base_identity(tiny_base), progress=False)


def test_early_stopping_keeps_the_best_evaluation(loaded_base, tiny_base, small_data, tmp_path):
    from loraplex.trainer.train import train_task

    model, tokenizer = loaded_base
    # A learning rate far too high: the eval loss soon stops improving.
    config = TaskConfig(task="s", data=small_data, **SENTIMENT, out=tmp_path, max_steps=40, batch_size=8,
                        eval_steps=1, early_stopping_patience=2, learning_rate=0.5, lr_scheduler="constant",
                        max_grad_norm=None, eval_split=0.2)  # fmt: skip
    training = train_task(model, tokenizer, config, base_identity(tiny_base), progress=False).training
    assert training["stopped_early"]
    assert training["steps"] < 40
    losses = [loss for _, loss in training["eval_loss"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert training["best_step"] == training["eval_loss"][best][0] == training["steps"] - 2
    assert training["final_eval_loss"] == pytest.approx(losses[best], rel=1e-4)


def test_phi3_trains_with_its_own_projections(tiny_base_factory, small_data, tmp_path):
    from loraplex.trainer.train import train

    config = TaskConfig(task="s", data=small_data, **SENTIMENT, out=tmp_path, max_steps=2, eval_split=0.05)
    result = train(tiny_base_factory("phi3"), config, progress=False, summary=False)
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_qlora_fails_at_once_without_cuda_or_bitsandbytes(tmp_path, small_data):
    import importlib.util

    import torch
    from loraplex.trainer.train import QLoRAUnavailable, train_tasks

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this machine can run QLoRA")
    config = TaskConfig(task="s", data=small_data, **SENTIMENT, out=tmp_path, method="qlora")
    # The base does not even exist: the check comes before anything is loaded.
    with pytest.raises(QLoRAUnavailable, match=r"--method qlora needs .*(CUDA|bitsandbytes).*use --method lora"):
        train_tasks(tmp_path / "no-base", [config], progress=False)


def test_cli_trains_from_flags_and_from_a_task_file(tiny_base, small_data, tmp_path, capsys):
    from loraplex.runtime.app.cli import main

    common = ["--max-steps", "2", "--eval-split", "0.05", "--no-progress", "--threads", "1"]
    flags = ["train", "--base", str(tiny_base), "--task", "mood", "--data", str(small_data),
             "--prompt-template", SENTIMENT["prompt_template"], "--completion-template", " {label}",
             "--out", str(tmp_path / "flags"), "--rank", "4", "--target-modules", "q_proj", "v_proj"]  # fmt: skip
    assert main(flags + common) == 0
    adapter = json.loads((tmp_path / "flags" / "mood" / "adapter_config.json").read_text())
    assert (adapter["r"], sorted(adapter["target_modules"])) == (4, ["q_proj", "v_proj"])
    assert "mood" in capsys.readouterr().out  # the summary table

    from_file = ["train", "--config", str(DATA_DIR / "tasks.yaml"), "--base", str(tiny_base), "--task", "translate",
                 "--out", str(tmp_path / "file")]  # fmt: skip
    assert main(from_file + common) == 0
    training = json.loads((tmp_path / "file" / "translate" / "training.json").read_text())
    assert (training["steps"], training["config"]["eval_split"], training["config"]["rank"]) == (2, 0.05, 8)
    assert not (tmp_path / "file" / "sentiment").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-modules", "q_proj", "qkv_proj"], "target module 'qkv_proj' does not exist in llama models"),
        (["--completion-template", " {verdict}"], "task 't': DATA: record 0 has no field 'verdict' required by the "
                                                  "template (record has: label, text); add 'verdict' to every record, "
                                                  "or change the completion template"),
        (["--eval-split", "0.99", "--data", "ONE"], "leaves no training data"),
        (["--data", "REVERSE", "--prompt-template", "{words}", "--completion-template", " {reversed}", "--metric",
          "accuracy"], "task 't': metric 'accuracy' needs a label task (completions from a small closed set), but its "
                       "400 records have 386 distinct completions; use metric: rouge_l, bleu or exact_match"),
        (["--data", "BLANK"], "task 't': BLANK: record 2 has an empty completion (completion template ' {label}' "
                              "renders to whitespace); give the record the text the model must produce, or drop it"),
        (["--config", "BAD_SEARCH", "--search", "2"], "task 'mood': search learning_rate range [0.01, 0.001] is empty"),
    ],
    ids=["unknown-module", "record-lacks-field", "no-training-data", "metric-does-not-fit", "empty-completion",
         "empty-search-range"],
)
def test_cli_reports_bad_input_and_exits_2(tiny_base, small_data, tmp_path, capsys, extra, message):
    from loraplex.runtime.app.cli import main

    files = {"ONE": tmp_path / "one.jsonl", "BLANK": tmp_path / "blank.jsonl", "BAD_SEARCH": tmp_path / "bad.yaml",
             "REVERSE": DATA_DIR / "reverse.jsonl", "DATA": small_data}  # fmt: skip
    lines = small_data.read_text().splitlines()
    files["ONE"].write_text(lines[0] + "\n")
    files["BLANK"].write_text("\n".join(lines[:2] + [json.dumps({"text": "the show was", "label": " "})] + lines[2:]))
    files["BAD_SEARCH"].write_text(f"tasks:\n  mood: {{data: {small_data}, prompt_template: '{{text}}', "
                                   "completion_template: ' {label}', search: {learning_rate: [0.01, 0.001]}}\n")
    extra = [str(files[arg]) if arg in files else arg for arg in extra]
    args = ["train", "--base", str(tiny_base), "--task", "t", "--data", str(small_data),
            "--prompt-template", SENTIMENT["prompt_template"], "--completion-template", " {label}",
            "--out", str(tmp_path), "--no-progress", *extra]  # fmt: skip
    if "--config" in extra:
        args = ["train", "--base", str(tiny_base), "--no-progress", *extra]
    assert main(args) == 2
    for name, path in files.items():
        message = message.replace(name, str(path))
    assert message in capsys.readouterr().err


def test_cli_rejects_a_base_that_is_not_a_causal_lm(tmp_path, small_data, capsys):
    from loraplex.runtime.app.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    args = ["train", "--base", str(tmp_path), "--task", "t", "--data", str(small_data), "--prompt-template", "{text}",
            "--completion-template", " {label}", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    assert "is not a causal language model" in capsys.readouterr().err


def test_tensorboard_events_curves_png_and_a_budget_that_ends_too_soon(loaded_base, tiny_base, small_data, tmp_path,
                                                                        capsys):  # fmt: skip
    from loraplex.trainer.summary import print_summary
    from loraplex.trainer.train import train_task
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tokenizer = loaded_base
    config = TaskConfig(task="s", data=small_data, **SENTIMENT, out=tmp_path, max_steps=6, eval_steps=2,
                        logging_steps=2, batch_size=8, report_to="tensorboard")  # fmt: skip
    result = train_task(model, tokenizer, config, base_identity(tiny_base), progress=False)
    training = result.training
    assert training["train_loss"] == [[2, pytest.approx(training["train_loss"][0][1])], [4, pytest.approx(
        training["train_loss"][1][1])], [6, pytest.approx(training["train_loss"][2][1])]]  # fmt: skip
    events = EventAccumulator(str(tmp_path / "s" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/accuracy", "final/accuracy",
            "final/base_accuracy", "final/perplexity"} <= set(scalars)  # fmt: skip
    assert [e.step for e in events.Scalars("eval/accuracy")] == [2, 4, 6]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([v for _, v in training["eval_loss"]])
    png = tmp_path / "s" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert training["files"] == {"curves": "curves.png", "tensorboard": "tensorboard"}

    # Six steps are far from enough: the metric is still moving and the summary says so.
    assert (training["stop_reason"], training["plateaued"]) == ("budget", False)
    print_summary([result])
    out = " ".join(capsys.readouterr().out.split())
    assert "note s: accuracy may still improve: the 6-step budget ended training" in out
    assert "raise max_steps" in out


def test_tasks_share_one_base_load_and_each_starts_from_a_fresh_lora(tiny_base, small_data, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    from loraplex.trainer import train as train_module
    from safetensors.torch import load_file

    loads = []
    real_load = train_module.load_base_model
    monkeypatch.setattr(train_module, "load_base_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    options = dict(data=small_data, **SENTIMENT, out=tmp_path, max_steps=3, eval_steps=3, batch_size=8)
    configs = [TaskConfig(task=name, **options) for name in ("first", "second")]
    results = train_module.train_tasks(tiny_base, configs, progress=False, num_threads=1)
    assert len(loads) == 1
    # The same options under two names: the second task's LoRA starts where the first's did, not where it ended.
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in results)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    out = " ".join(capsys.readouterr().out.split())
    assert "2 task(s) in" in out and "(base model loaded once" in out


def test_every_tasks_data_is_checked_before_the_first_task_trains(tiny_base, small_data, tmp_path):
    from loraplex.trainer.dataset import DatasetError
    from loraplex.trainer.train import train_tasks

    good = TaskConfig(task="good", data=small_data, **SENTIMENT, out=tmp_path, max_steps=1)
    bad = TaskConfig(task="bad", data=small_data, prompt_template="{review}", completion_template=" {label}",
                     out=tmp_path)  # fmt: skip
    with pytest.raises(DatasetError, match=r"task 'bad': .*record 0 has no field 'review'.*add 'review' to every"):
        train_tasks(tiny_base, [good, bad], progress=False, summary=False)
    assert not (tmp_path / "good").exists()


def test_cli_search_trains_n_trials_and_keeps_the_best(tiny_base, small_data, tmp_path, capsys):
    """`--search 2` from the command line: two trials in the default space, trial 0 on the task's own values."""
    from loraplex.runtime.app.cli import main

    out = tmp_path / "searched"
    assert main(["train", "--base", str(tiny_base), "--task", "mood", "--data", str(small_data),
                 "--prompt-template", SENTIMENT["prompt_template"], "--completion-template", " {label}",
                 "--out", str(out), "--search", "2", "--max-steps", "2", "--eval-split", "0.25", "--no-progress",
                 "--threads", "1"]) == 0  # fmt: skip
    search = json.loads((out / "mood" / "training.json").read_text())["search"]
    trials = search["trials"]
    assert (search["trials_requested"], search["trials_run"], [t["trial"] for t in trials]) == (2, 2, [0, 1])
    own = TaskConfig(task="mood", data=small_data, **SENTIMENT, out=out)
    assert (trials[0]["params"]["learning_rate"], trials[0]["params"]["rank"]) == (own.learning_rate, own.rank)
    assert {p.name for p in (out / "mood" / "search").iterdir()} == {"trial-00", "trial-01"}
    assert "search: mood (2 of 2 trials" in capsys.readouterr().out
