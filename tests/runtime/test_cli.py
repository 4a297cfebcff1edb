"""The thin CLI: `loraplex generate` and `loraplex adapters list|load|unload` against a live server."""

from __future__ import annotations

import json

from loraplex.runtime.app.cli import main


def test_generate_prints_the_servers_completion(server, capsys):
    with server.client() as client:
        want = client.generate("alpha", inputs={"text": "the movie was great"}, max_new_tokens=6).text
    assert main(["generate", "--target", server.target, "--adapter", "alpha", "--input", "text=the movie was great",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "--target", server.target, "--adapter", "alpha", "--input", "text=the movie was great",
                 "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "--target", server.target, "--adapter", "beta", "--prompt", "hi", "--max-new-tokens",
                 "3", "--json"]) == 0
    response = json.loads(capsys.readouterr().out)
    assert response["adapter"] == "beta" and response["usage"]["completionTokens"] == 3


def test_generate_with_an_output_constraint(server, capsys):
    base = ["generate", "--target", server.target, "--adapter", "alpha", "--prompt", "hi", "--max-new-tokens", "8"]
    assert main([*base, "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out in ("yes\n", "no\n")
    assert main([*base, "--regex", "[0-9]{1,4}", "--temperature", "1", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip().isdigit()
    assert main([*base, "--regex", "[0-"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_generate_reports_the_status_code_and_exits_non_zero(server, capsys):
    assert main(["generate", "--target", server.target, "--adapter", "nope", "--prompt", "hi"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_adapters_list_load_unload(server_factory, adapter_root, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("t0ken")
    live = server_factory(adapter_root=adapter_root, auth_token_file=token, metrics_port=None)
    target = ["--target", live.target]
    assert main(["adapters", "load", *target, "delta", "beta.onnx_adapter", "--version", "7"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["adapters", "load", *target, "--token-file", str(token), "delta", "beta.onnx_adapter",
                 "--version", "7"]) == 0
    assert capsys.readouterr().out == "loaded delta version 7\n"
    assert main(["adapters", "list", *target]) == 0
    listed = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["delta", "version=7"] in listed and len(listed) == 4
    assert main(["adapters", "unload", *target, "--token-file", str(token), "delta"]) == 0
    assert capsys.readouterr().out.startswith("unloaded delta version 7")


def test_the_demo_commands_run_the_demos_with_their_options(monkeypatch, tmp_path):
    """`loraplex demo` (what `make demo` runs; end to end in tests/e2e with the same stages) and
    `--real` call their jobs with the output folder given, or their defaults."""
    from pathlib import Path

    from loraplex.runtime.app import demo, demo_real

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out: calls.append(("demo", Path(out))) or 0)
    monkeypatch.setattr(demo_real, "run_real_demo", lambda out: calls.append(("real", Path(out))) or 0)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert main(["demo"]) == 0
    assert main(["demo", "--real"]) == 0
    assert calls == [("demo", tmp_path), ("demo", Path("artifacts/demo")), ("real", Path("artifacts/demo-real"))]


def test_classify_prints_each_labels_probability(server, capsys):
    labels = ["yes", "no", "maybe so"]
    with server.client() as client:
        want = client.classify("alpha", "Review: fine\nSentiment:", labels=labels)
    assert main(["classify", "--target", server.target, "--adapter", "alpha", "--prompt", "Review: fine\nSentiment:",
                 *[a for label in labels for a in ("--label", label)]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(None, 1)[1] for line in lines] == [f"{x.probability:.4f}" for x in want.labels]
    assert [line.rsplit(None, 1)[0] for line in lines] == [repr(x.label) for x in want.labels]
    assert main(["classify", "--target", server.target, "--adapter", "beta", "--prompt", "hi"]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_generate_samples_and_logprobs(server, capsys):
    base = ["generate", "--target", server.target, "--adapter", "gamma", "--prompt", "hi", "--max-new-tokens", "4",
            "--temperature", "1", "--seed", "9"]
    assert main([*base, "--n", "2"]) == 0
    with server.client() as client:
        want = [client.generate("gamma", "hi", max_new_tokens=4, temperature=1, seed=9 + i).text for i in range(2)]
    assert capsys.readouterr().out == "".join(text + "\n" for text in want)
    assert main([*base, "--logprobs", "2", "--json"]) == 0
    response = json.loads(capsys.readouterr().out)
    assert len(response["logprobs"]) == len(response["tokenIds"]) and len(response["logprobs"][0]["top"]) == 2
