"""loraplex on ARM64 under emulation, against the same package served on x86 (run by `bench/arm64/run.sh`).

The arm64 server is `loraplex serve` run by Debian's arm64 python3.11 under `qemu-aarch64-static`
(user mode: the aarch64 wheels of onnxruntime, onnxruntime-genai, llguidance, tokenizers and grpcio
execute their ARM code), the x86 one by this Python. Both serve their own hard-linked copy of the
package (each writes its own session cache), `--profile edge`. Then:

- the gRPC contract on arm64: health, Generate, GenerateStream, Adapters.Load (a package adapter
  under a new name: its greedy tokens are the original's), Load again with the other adapter's file
  (a replace: the tokens follow it), Unload (the name is then NOT_FOUND);
- greedy agreement: the same prompts on the base model and on each adapter, token for token;
- task accuracy: exact match on both adapters' evaluation records, each server the same requests.

Timings under emulation mean nothing; correctness does. Writes `report.json` into `--out` and prints
a Markdown summary (for bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure.results import Prompt
from bench.paths import REPO_ROOT
from bench.systems.loraplex_server import LoraplexServer

OUT = REPO_ROOT / "bench" / "out"
# A Neoverse-N1 (Cortex-A76 class: Raspberry Pi 5, Graviton 2, Ampere Altra): NEON and dot product, no SVE.
QEMU_CPU = "neoverse-n1"
# onnxruntime reads the CPU's description from /proc/cpuinfo, which qemu-user passes through from the
# x86 host (its ARM parser then crashes); files under the sysroot shadow the host's (`qemu -L`).
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
    f"CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for i in range(2))
VERSIONS = ("import json, platform, sys, numpy, onnxruntime, onnxruntime_genai, llguidance, tokenizers, grpc; "
            "print(json.dumps({'machine': platform.machine(), 'python': sys.version.split()[0], "
            "'onnxruntime': onnxruntime.__version__, 'onnxruntime_genai': onnxruntime_genai.__version__, "
            "'numpy': numpy.__version__, 'llguidance': llguidance.__version__, 'tokenizers': tokenizers.__version__, "
            "'grpcio': grpc.__version__}))")


def default_package() -> Path:
    found = sorted(OUT.glob("real-*/pkg_int4_n2/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no real int4 package under bench/out/: build it with `python -m bench.run --build-only`")
    return found[-1].parent


def link_package(source: Path, target: Path) -> Path:
    """A hard-linked copy of the package's own files (no batched graph or session cache: each side makes its own)."""
    if target.exists():
        return target
    scratch = target.with_name(target.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    for path in source.rglob("*"):
        if path.is_dir() or ".batched." in path.name or path.name.startswith("."):
            continue
        dest = scratch / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest)
    scratch.rename(target)
    return target


class Arm64:
    """How to run the arm64 Python: qemu-aarch64 over the sysroot, the runtime-only install on PYTHONPATH."""

    def __init__(self, sysroot: Path, pythonpath: str):
        self.sysroot = sysroot
        (sysroot / "proc").mkdir(exist_ok=True)
        (sysroot / "proc" / "cpuinfo").write_text(CPUINFO)
        qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        if qemu is None:
            raise SystemExit("qemu-aarch64 is not installed (Debian: apt-get install qemu-user-static)")
        self.launcher = (qemu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11"))
        self.env = {"PYTHONPATH": pythonpath, "QEMU_CPU": QEMU_CPU, "PYTHONNOUSERSITE": "1"}

    def versions(self) -> dict[str, str]:
        out = subprocess.run([*self.launcher, "-c", VERSIONS], env={**os.environ, **self.env}, capture_output=True,
                             text=True, check=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])


def x86_versions() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", VERSIONS], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(results: dict[str, str], name: str, fn) -> None:
    try:
        detail = fn()
        results[name] = f"ok{': ' + detail if detail else ''}"
    except Exception as exc:  # a failed check is reported, the others still run
        results[name] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def contract(server: LoraplexServer, adapters: list[str], prompt: Prompt, tokens: int) -> dict[str, str]:
    """The gRPC contract checks the x86 tests run, against `server` (which is already SERVING)."""
    grpc, gen = server.grpc, server.gen_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    results: dict[str, str] = {}
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    _, admin = server._stubs(-1)

    def greedy(adapter: str | None) -> list[int]:
        got = server.generate(prompt, adapter, tokens)
        if not got.ok:
            raise RuntimeError(f"GenerateStream on {adapter or 'the base model'}: {got.error}")
        return got.token_ids

    def check_health() -> str:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status
        return "SERVING"

    def check_generate() -> str:
        reply = server._stubs()[0].Generate(server._request(prompt, adapters[0], tokens), timeout=600)
        assert reply.usage.completion_tokens == tokens, reply.usage
        return f"{reply.usage.completion_tokens} tokens"

    def check_stream() -> str:
        ids = greedy(adapters[0])
        assert len(ids) == tokens, ids
        return f"{len(ids)} tokens streamed"

    originals = {name: greedy(name) for name in adapters}

    def check_load() -> str:
        admin.Load(server.adm_pb2.LoadAdapterRequest(name="copy", path=f"{adapters[0]}.onnx_adapter"), timeout=600)
        assert greedy("copy") == originals[adapters[0]], "the loaded copy's tokens differ from the original's"
        return f"'copy' of {adapters[0]}: same greedy tokens"

    def check_replace() -> str:
        admin.Load(server.adm_pb2.LoadAdapterRequest(name="copy", path=f"{adapters[1]}.onnx_adapter"), timeout=600)
        assert greedy("copy") == originals[adapters[1]], "the replaced adapter's tokens are not the new file's"
        return f"'copy' now {adapters[1]}: its greedy tokens"

    def check_unload() -> str:
        admin.Unload(server.adm_pb2.UnloadAdapterRequest(name="copy"), timeout=600)
        try:
            server._stubs()[0].Generate(server._request(prompt, "copy", 1), timeout=600)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.code()
            return "then NOT_FOUND"
        raise AssertionError("the unloaded adapter still answered")

    for name, fn in (("health", check_health), ("generate", check_generate), ("stream", check_stream),
                     ("load", check_load), ("replace", check_replace), ("unload", check_unload)):
        _check(results, name, fn)
    channel.close()
    assert gen is not None
    return results


def agreement(a: LoraplexServer, b: LoraplexServer, prompts: list[Prompt], adapters: list[str | None],
              tokens: int) -> dict[str, Any]:
    """Per adapter (None: the base model): how many prompts give the same greedy tokens on both servers."""
    out = {}
    for adapter in adapters:
        same, prefixes = 0, []
        for prompt in prompts:
            ours, theirs = a.generate(prompt, adapter, tokens), b.generate(prompt, adapter, tokens)
            if not (ours.ok and theirs.ok):
                prefixes.append(-1)
                continue
            same += ours.token_ids == theirs.token_ids
            prefixes.append(next((i for i, (x, y) in enumerate(zip(ours.token_ids, theirs.token_ids, strict=True))
                                  if x != y), tokens))
        out[adapter or "base"] = {"same": same, "prompts": len(prompts), "tokens": tokens,
                                  "equal_prefix": prefixes}  # tokens equal before the first difference
    return out


def accuracy(server: LoraplexServer, package: Path, data: Path, tasks: list[str], records: int,
             max_tokens: int) -> dict[str, dict[str, int]]:
    """Exact match (the completion, then EOS or the output contract's end) on each task's evaluation records."""
    from loraplex.adapters.package.manifest import Manifest
    from loraplex.adapters.package.template import PromptTemplate

    manifest = Manifest.load(package)
    out = {}
    for task in tasks:
        template = PromptTemplate.from_dict(manifest.adapters[task].template)
        lines = (data / f"{task}.eval.jsonl").read_text().splitlines()[:records]
        correct = 0
        for line in lines:
            record = json.loads(line)
            fields = {f: str(record[f]) for f in template.prompt_fields}
            text, at_end = server.complete_task(task, fields, max_tokens)
            correct += at_end and text == template.render_completion(record)
        out[task] = {"correct": correct, "total": len(lines)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.arm64.driver", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT / "arm64")
    parser.add_argument("--package", type=Path, default=None, help="default: the real int4 package, 2 adapters")
    parser.add_argument("--records", type=int, default=60, help="evaluation records per task")
    parser.add_argument("--prompts", type=int, default=2, help="prompts for greedy agreement")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per agreement request")
    parser.add_argument("--checks", default="contract,agreement,accuracy", help="which checks (comma list)")
    args = parser.parse_args(argv)
    checks = set(args.checks.split(","))
    source = (args.package or default_package()).resolve()
    data = source.parent / "data"
    arm = Arm64(Path(os.environ["ARM64_SYSROOT"]), os.environ["ARM64_PYTHONPATH"])
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "package": str(source),
                              "qemu_cpu": QEMU_CPU, "host": platform.machine()}
    report["versions"] = {"arm64": arm.versions(), "x86": x86_versions()}
    qemu = subprocess.run([arm.launcher[0], "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    report["versions"]["qemu"] = qemu
    print(json.dumps(report["versions"]), flush=True)
    prompts_file = json.loads((source.parent / "prompts.json").read_text())
    prompts = [Prompt(t, ids) for t, ids in zip(prompts_file["prompts"], prompts_file["ids"], strict=True)]
    prompts = prompts[: args.prompts]
    tasks = sorted(json.loads((source / "manifest.json").read_text())["adapters"])
    logs = args.out / "logs"
    common = dict(log_dir=logs, max_batch=4, extra_args=("--profile", "edge", "--threads", "2"))
    arm_package = link_package(source, args.out / "pkg-arm64")
    report["arm64_session_cache_before"] = any(arm_package.glob("*.session.onnx"))
    started = time.perf_counter()
    arm_server = LoraplexServer(arm_package, "batched", label="arm64", launcher=arm.launcher, env=arm.env,
                                start_timeout_s=3600, **common)
    report["arm64_start_s"] = round(time.perf_counter() - started, 1)
    x86_server = LoraplexServer(link_package(source, args.out / "pkg-x86"), "batched", label="x86", **common)
    try:
        if "contract" in checks:
            report["contract"] = contract(arm_server, tasks, prompts[0], 8)
            print(json.dumps(report["contract"]), flush=True)
        if "agreement" in checks:
            report["agreement"] = agreement(x86_server, arm_server, prompts, [None, *tasks], args.tokens)
            print(json.dumps(report["agreement"]), flush=True)
        for label, server, package in (("x86", x86_server, args.out / "pkg-x86"),
                                       ("arm64", arm_server, args.out / "pkg-arm64")):
            if "accuracy" not in checks:
                break
            started = time.perf_counter()
            got = accuracy(server, package, data, tasks, args.records, 32)
            report.setdefault("accuracy", {})[label] = {**got, "seconds": round(time.perf_counter() - started, 1)}
            print(label, json.dumps(report["accuracy"][label]), flush=True)
    finally:
        arm_server.close()
        x86_server.close()
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0 if all(v.startswith("ok") for v in report.get("contract", {}).values()) else 1


def markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    lines = [f"Run {report['date']}: `bench/arm64/run.sh`, {v['qemu']} (`-cpu {report['qemu_cpu']}`) on x86-64; "
             f"arm64 Python {v['arm64']['python']} (Debian bookworm), onnxruntime {v['arm64']['onnxruntime']}, "
             f"onnxruntime-genai {v['arm64']['onnxruntime_genai']}, llguidance {v['arm64']['llguidance']}, "
             f"tokenizers {v['arm64']['tokenizers']}, grpcio {v['arm64']['grpcio']}, numpy {v['arm64']['numpy']} "
             "(aarch64 manylinux wheels); x86 the same versions. Package: the real SmolLM2-135M int4, 2 adapters, "
             "`--profile edge --threads 2`.", "",
             "| check | arm64 (emulated) |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in report.get("contract", {}).items()]
    lines += ["", "| greedy agreement with x86 | prompts with the same tokens | equal tokens before the first "
              "difference, per prompt |", "|---|---|---|"]
    lines += [f"| {name} | {r['same']}/{r['prompts']} ({r['tokens']} tokens) | {r.get('equal_prefix', '')} |"
              for name, r in report.get("agreement", {}).items()]
    acc = report.get("accuracy", {})
    if "arm64" in acc:
        lines += ["", "| task accuracy (exact match) | x86 | arm64 | difference (points) |", "|---|---|---|---|"]
        for task in (t for t in acc["x86"] if t != "seconds"):
            x, a = acc["x86"][task], acc["arm64"][task]
            diff = 100 * (a["correct"] / a["total"] - x["correct"] / x["total"])
            lines.append(f"| {task} | {x['correct']}/{x['total']} | {a['correct']}/{a['total']} | {diff:+.1f} |")
        start = "start" if report["arm64_session_cache_before"] else "first start (session cache written)"
        lines += ["", f"Under emulation: {start} {report['arm64_start_s']} s; "
                  f"accuracy pass {acc['arm64']['seconds']} s on arm64 against {acc['x86']['seconds']} s on x86."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
