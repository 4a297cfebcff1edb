"""Render the edge part of `results.json` (loraplex against llama.cpp) as RESULTS.md sections."""

from __future__ import annotations

from bench.report.markdown import load_average, md_table, num, ratio_text

MIB = 2**20
POLICY_TITLE = {False: "", True: " (threads waiting passively on both sides)"}
STEPS = ("python", "imports", "package", "engine", "tokenizer", "adapters", "requests", "idle", "again")
STEP_TEXT = {
    "python": "Python interpreter",
    "imports": "imports (grpc, protobuf, numpy, onnxruntime, loraplex)",
    "package": "package opened (manifest, genai_config, LoRA inputs)",
    "engine": "engine: onnxruntime session (weights, prepacked weights), banks, KV cache",
    "tokenizer": "tokenizer (and llguidance's, built beside it when a package adapter has an output contract)",
    "adapters": "adapter files read, checked, handed to the engine",
    "requests": "one request on the base and on each adapter (banks filled, activations)",
    "idle": "idle 1.5 s later (free heap handed back; the code pages only start-up ran dropped, once)",
    "again": "the same requests again, idle 1.5 s later (the code serving runs faulted back in)",
}


def _mib(value) -> str:
    return num(value / MIB, 0) if isinstance(value, (int, float)) else "—"


def _best(values: dict[str, float | None], lowest: bool = True) -> tuple[str, float] | None:
    present = {k: v for k, v in values.items() if v}
    if not present:
        return None
    name = (min if lowest else max)(present, key=present.get)
    return name, present[name]


def _header(edge: dict) -> list[str]:
    wl = edge.get("workload", {})
    files = wl.get("adapter_file_bytes", {})
    return [
        "## Edge: loraplex against llama.cpp on the real model",
        "",
        f"- Model: {wl.get('model')}. Adapters: "
        + (f"{wl.get('total_adapters')} from existing packages (`bench.edge.existing`: "
           f"{', '.join(wl['existing_packages'].values())}); the scenarios that name two use "
           f"{', '.join(wl.get('tasks', []))}" if wl.get("existing_packages") else
           f"{len(wl.get('tasks', []))} trained with `loraplex train` ({', '.join(wl.get('tasks', []))}; rank "
           f"{wl.get('training', {}).get('rank')}, {', '.join(wl.get('training', {}).get('target_modules', []))}), "
           f"plus random ones of the same shape up to {wl.get('total_adapters')}")
        + "; loraplex serves `loraplex export` packages (int4 = the builder's int4 of the "
        "fp32 import, LoRA kept fp32), llama.cpp the Q4_1 GGUF as shipped (and an f32 GGUF of the same weights) "
        "with the same adapters converted by `loraplex adapters export-gguf` (f32).",
        f"- One adapter file: {num(files.get('onnx_adapter', 0) / 1024, 0)} KiB `.onnx_adapter`, "
        f"{num(files.get('gguf', 0) / 1024, 0)} KiB LoRA GGUF.",
        f"- Threads: {edge.get('threads')} on both sides. " + _policy(edge),
        f"- Requests: {wl.get('prompt_tokens')}-token prompts, {wl.get('new_tokens')} new tokens, greedy, EOS ignored "
        "(throughput); accuracy stops at EOS. The prompts repeat, so loraplex's speed scenarios run with its prefix "
        "cache off (`--no-prefix-cache`; llama-server keeps its per-slot prompt cache, its default); the memory and "
        "start-up scenarios serve the shipped defaults.",
        "",
    ]


def _policy(edge: dict) -> str:
    if edge.get("policy") != "default":  # results of a run before both policies were measured
        return ("Threads waiting passively on both sides (llama.cpp `OMP_WAIT_POLICY=PASSIVE`, loraplex "
                "`--profile edge`); llama.cpp's own default lets them spin, which this run did not measure.")
    return ("Every system runs at its own default and best setting for a dedicated device: threads spin "
            "(llama.cpp's OpenMP default, loraplex `--profile edge --spin`); llama-server with one slot and with "
            "one per client, llama-cpp-python in process; each ratio is against the peer's best. Threads waiting "
            "passively on both sides (llama.cpp `OMP_WAIT_POLICY=PASSIVE`, loraplex `--profile edge --no-spin`) are "
            "the second table of each scenario (loraplex's default spins 20 us, then sleeps: between the two). "
            "Before each spinning scenario the bench "
            f"measures the CPU other processes use; above {edge.get('busy_threshold', 0):.0%} its comparison is not "
            "reported.")


def _breakdown(edge: dict) -> list[str]:
    data = edge.get("breakdown") or {}
    profiles = [p for p in ("default", "edge") if "steps" in data.get(p, {})]
    if not profiles:
        return []
    rows = []
    by_profile = {p: {s["step"]: s for s in data[p]["steps"]} for p in profiles}
    for step in STEPS:
        cells = [STEP_TEXT[step]]
        for p in profiles:
            steps = by_profile[p]
            row, order = steps.get(step), [s["step"] for s in data[p]["steps"]]
            before = steps.get(order[order.index(step) - 1]) if step in order and order.index(step) else None
            if row is None:
                cells += ["—", "—", "—"]
                continue
            delta = row["VmRSS"] - (before["VmRSS"] if before else 0)
            cells += [f"+{_mib(delta)}", f"{_mib(row['RssAnon'])} / {_mib(row['RssFile'])}", num(row["seconds"], 2)]
        rows.append(cells)
    header = ["step"]
    for p in profiles:
        header += [f"{p}: RSS added (MiB)", f"{p}: anon / file (MiB)", f"{p}: s"]
    last = {p: by_profile[p].get("again") or by_profile[p].get("idle", {}) for p in profiles}
    extra = "; ".join(_idle_split(p, last[p]) for p in profiles if last[p])
    intro = ["### Where the memory goes (loraplex serve, int4 package, 2 adapters)", "",
             "Each step of `loraplex serve`'s start in a fresh process (`python -m bench.edge.memory_breakdown`), "
             "RSS after it (anonymous / file-backed), and the seconds it took.", ""]
    return intro + md_table(header, rows) + [extra, ""]


def _idle_split(profile: str, row: dict) -> str:
    mapped = row.get("mapped", {})
    return (f"{profile}, idle: model files mapped {_mib(mapped.get('model_files'))} MiB, shared libraries "
            f"{_mib(mapped.get('libraries'))} MiB, anonymous {_mib(mapped.get('anonymous'))} MiB (of which banks "
            f"{_mib(row.get('bank_bytes'))} MiB for {row.get('bank_slots')} adapter slots + the base's, KV cache "
            f"{_mib(row.get('kv_bytes'))} MiB allocated, touched as used)")


def _cold(edge: dict) -> list[str]:
    data = edge.get("cold_start") or {}
    if not data:
        return []
    rows = [[name, num(r["median_s"], 2), ", ".join(num(x, 2) for x in r["runs"]), num(r.get("median_cpu_s"), 2)]
            for name, r in data.items()]
    errors = edge.get("cold_start_errors") or {}
    first = edge.get("cold_start_first_ever_s")
    lines = ["### Cold start", "", "Process start to the first streamed token of a request on an adapter (the "
             "server started with 2 adapters; health polled every 20 ms). llama-cpp-python: the interpreter's start "
             "to the first token of `generate`. loraplex: later starts (the per-machine session cache exists"
             + (f"; the first start on this machine, which writes it, took {first:.2f} s" if first else "")
             + "). CPU: the process's CPU seconds (all threads) by the first token, which a busy machine "
             "does not inflate as it does wall time.", ""] + md_table(["system", "median (s)", "runs (s)", "CPU (s)"],
                                                                      rows)
    return lines + ([f"Errors: {errors}", ""] if errors else [])


def _memory(edge: dict) -> list[str]:
    data = edge.get("memory") or {}
    if not data:
        return []
    counts = sorted({int(c) for r in data.values() for c in r})
    rows = []
    for name, by_count in data.items():
        cells = [name] + [_mib(by_count.get(str(c), {}).get("rss")) for c in counts]
        lo, hi = by_count.get(str(counts[-2]) if len(counts) > 1 else "", {}), by_count.get(str(counts[-1]), {})
        per = (hi["rss"] - lo["rss"]) / (counts[-1] - counts[-2]) if lo.get("rss") and hi.get("rss") else None
        cells.append(num(per / MIB, 2) if per else "—")
        rows.append(cells)
    return ["### Resident memory", "", "RSS (MiB) of a fresh process with N adapters, at rest: one request on the "
            "base and on each adapter, 2 s idle, the same again, RSS 2 s later (llama-cpp-python: in process, "
            "once). Per extra adapter: the slope between the two largest counts.",
            ""] + md_table(
        ["system", *(f"{c} adapter{'s' if c > 1 else ''}" for c in counts), "MiB per extra adapter"], rows)


def _busy_line(edge: dict, key: str) -> list[str]:
    share = (edge.get("busy") or {}).get(key)
    return [f"**Not reported:** other processes used {share:.0%} of the CPU before this scenario; spinning threads "
            "need their cores, so these figures measure the neighbours too.", ""] if share is not None else []


def _single(edge: dict, passive: bool = False) -> list[str]:
    data = edge.get("single") or {}
    if not data:
        return []
    roof = (edge.get("roofline") or {}).get("tokens_per_s")
    rows = []
    for name, r in data.items():
        sw, base = r.get("switching", {}), r.get("base", {})
        share = f"{sw['decode_tokens_per_s'] / roof:.0%}" if roof and sw.get("decode_tokens_per_s") and "int4" in name \
            else ""
        rows.append([name, num(sw.get("tokens_per_s")), num(sw.get("decode_tokens_per_s")), num(sw.get("ttft_ms")),
                     num(base.get("tokens_per_s")), share])
    lines = [f"### Single stream, adapters switching{POLICY_TITLE[passive]}", "",
             "One request at a time, two adapters alternating (the trained ones in `make bench`; a switch on "
             "every request), and the base model alone; medians. Roofline share: decode tokens/s over copy "
             f"bandwidth / int4 weight bytes per token ({num(roof)} tok/s).", ""]
    lines += [] if passive else _busy_line(edge, "single")
    return lines + md_table(["system", "tokens/s", "decode tokens/s", "TTFT (ms)", "base model tokens/s",
                           "of roofline"], rows)


def _concurrency(edge: dict, passive: bool = False) -> list[str]:
    data = (edge.get("concurrency") or {}).get("by_adapters") or {}
    if not data:
        return []
    rows = []
    for spread, systems in data.items():
        for name, r in systems.items():
            if "error" in r:
                rows.append([spread, name, "failed", "", "", r["error"].splitlines()[0][:100]])
                continue
            rows.append([spread, name, num(r["tokens_per_s"]), num(r.get("p50_s"), 2), num(r.get("p99_s"), 2),
                         r.get("note", "")])
    clients = edge["concurrency"].get("clients")
    rounds = max((r.get("rounds", 1) for systems in data.values() for r in systems.values()), default=1)
    turns = f" The systems take turns, {rounds} rounds each, pooled." if rounds > 1 else ""
    return [f"### Concurrency{POLICY_TITLE[passive]}", "", f"{clients} closed-loop clients, requests round robin "
            f"over the adapters.{turns} llama-cpp-python serves one request at a time (measured, replayed as a FIFO "
            "queue); "
            f"llama-server runs `-np {clients}` slots but batches only requests with the same adapter set.",
            ""] + ([] if passive else _busy_line(edge, "concurrency")) + md_table(
        ["adapters", "system", "tokens/s", "p50 (s)", "p99 (s)", "how"], rows)


def _step_cost(edge: dict) -> list[str]:
    data = edge.get("step_cost") or {}
    times = data.get("ms") or {}
    if not times.get("1"):
        return []
    rows = sorted(times, key=int)
    return ["### Decode step as its rows grow", "",
            f"The int4 package's decode step (the engine's session run through its IO binding, KV rows of 64 tokens), "
            f"rows spread over {data.get('spread')} adapters, {data.get('threads')} threads spinning, in a fresh "
            f"process; medians of {data.get('repeats')} (`python -m bench.measure.step_cost` adds each matmul "
            "shape alone).", ""] + md_table(
        ["rows", *rows], [["ms", *(num(times[r], 2) for r in rows)],
                          ["vs 1 row", *(f"{times[r] / times['1']:.2f}x" for r in rows)],
                          ["ms per row", *(num(times[r] / int(r), 2) for r in rows)]])


def _accuracy(edge: dict) -> list[str]:
    data = edge.get("accuracy") or {}
    if not data:
        return []
    tasks = sorted({t for r in data.values() for t in r})
    rows = []
    for name, by_task in data.items():
        cells = [name]
        correct = total = 0
        for t in tasks:
            r = by_task.get(t, {})
            cells.append(f"{r.get('correct', 0)} / {r.get('total', 0)}" + (f" ({r['failed']} failed)"
                                                                           if r.get("failed") else ""))
            correct, total = correct + r.get("correct", 0), total + r.get("total", 0)
        cells.append(f"{correct / total:.1%}" if total else "—")
        rows.append(cells)
    return ["### Task accuracy", "", "Exact match (the completion's text, then EOS) on the evaluation records "
            "(wording unseen in training), every system on the same prompts.", ""] + md_table(
        ["system", *tasks, "all"], rows)


def _agreement(edge: dict) -> list[str]:
    data = edge.get("agreement") or {}
    if not data:
        return []
    rows = [[adapter, verdict] for adapter, verdict in data.items()]
    return ["### The exported GGUF adapters in llama.cpp", "", "Greedy tokens of loraplex fp32 and llama.cpp on the "
            "f32 GGUF with the same adapter (its GGUF from `loraplex adapters export-gguf`), up to loraplex's "
            "first EOS: equal tokens show the conversion (names, layout, q/k permutation, scale) is exact.",
            ""] + md_table(
        ["adapter", "llama.cpp f32 vs loraplex fp32"], rows)


def targets(edge: dict) -> list[list[str]]:
    """[target, needs, measured, status] for the edge targets: memory, cold start, speed and accuracy
    against llama.cpp on the same model."""
    out = []
    mem = edge.get("memory") or {}
    ours = mem.get("loraplex[batched] int4 edge", {})
    peers = {k: v for k, v in mem.items() if k.startswith("llama")}
    two = _best({k: v.get("2", {}).get("rss") for k, v in peers.items()})
    if ours.get("2", {}).get("rss") and two:
        ratio = ours["2"]["rss"] / two[1]
        out.append(["RSS, int4, 2 adapters, vs llama.cpp (its lower)", "≤ 1.50x",
                    f"{ratio_text(ratio, at_least=False)} ({two[0]})",
                    "met" if ratio <= 1.5 else "not met"])
    counts = sorted(int(c) for c in ours)
    file_bytes = (edge.get("workload") or {}).get("adapter_file_bytes", {}).get("onnx_adapter")
    if len(counts) >= 2 and file_bytes:
        lo, hi = counts[-2], counts[-1]
        if ours[str(lo)].get("rss") and ours[str(hi)].get("rss"):
            per = (ours[str(hi)]["rss"] - ours[str(lo)]["rss"]) / (hi - lo)
            out.append([f"each extra adapter ({lo} -> {hi}), vs its file", "≤ 1.20x",
                        f"{ratio_text(per / file_bytes, at_least=False)} "
                        f"({per / MIB:.2f} MiB per {file_bytes / MIB:.2f} MiB file)",
                        "met" if per <= 1.2 * file_bytes else "not met"])
    cold = (edge.get("cold_start") or {}).get("loraplex[batched] int4 edge")
    if cold:
        out.append(["process start to first token, int4", "≤ 1.00 s", f"{cold['median_s']:.2f} s",
                    "met" if cold["median_s"] <= 1.0 else "not met"])
    busy = edge.get("busy") or {}
    single = {} if "single" in busy else edge.get("single") or {}
    mine = single.get("loraplex[batched] int4 edge", {}).get("switching", {}).get("tokens_per_s")
    best = _best({k: v.get("switching", {}).get("tokens_per_s") for k, v in single.items()
                  if k.startswith("llama")}, lowest=False)
    for key, what in (("single", "single stream"), ("concurrency", "concurrency")):
        if key in busy:
            out.append([f"{what} vs llama.cpp", "—", f"not reported: the machine was busy ({busy[key]:.0%} of its "
                        "CPU used by other processes)", "—"])
    if mine and best:
        out.append(["single stream, adapters switching, vs llama.cpp (its faster)", "≥ 1.50x",
                    f"{ratio_text(mine / best[1])} ({best[0]})", "met" if mine / best[1] >= 1.5 else "not met"])
    mine_d = single.get("loraplex[batched] int4 edge", {}).get("switching", {}).get("decode_tokens_per_s")
    best_d = _best({k: v.get("switching", {}).get("decode_tokens_per_s") for k, v in single.items()
                    if k.startswith("llama")}, lowest=False)
    if mine_d and best_d:
        out.append(["decode only, one stream, vs llama.cpp (its faster)", "≥ 1.20x",
                    f"{ratio_text(mine_d / best_d[1])} ({best_d[0]})",
                    "met" if mine_d / best_d[1] >= 1.2 else "not met"])
    conc = {} if "concurrency" in busy else ((edge.get("concurrency") or {}).get("by_adapters") or {})
    spread = max(conc, key=int) if conc else None
    if spread:
        rows = conc[spread]
        ours_c = rows.get("loraplex[batched] int4 edge", {}).get("tokens_per_s")
        serial = _best({k: rows.get(k, {}).get("tokens_per_s")
                        for k in ("llama-cpp-python Q4_1 (serial)", "llama-server Q4_1 -np 1")}, lowest=False)
        if ours_c and serial:
            out.append([f"{edge['concurrency']['clients']} clients over {spread} adapters vs llama.cpp serial "
                        "(its faster)", "≥ 4.00x", f"{ratio_text(ours_c / serial[1])} ({serial[0]})",
                        "met" if ours_c / serial[1] >= 4 else "not met"])
        server = next((v.get("tokens_per_s") for k, v in rows.items()
                       if k.startswith("llama-server") and not k.endswith("-np 1")), None)
        if ours_c and server:
            out.append(["(same, vs llama-server with a slot per client)", "≥ 3.00x", ratio_text(ours_c / server),
                        "met" if ours_c / server >= 3 else "not met"])
    step = (edge.get("step_cost") or {}).get("ms") or {}
    if step.get("1") and step.get("8"):
        ratio = step["8"] / step["1"]
        out.append([f"an 8-row decode step vs a 1-row step (rows over {edge['step_cost'].get('spread')} adapters, "
                    "in process)", "≤ 1.60x",
                    f"{ratio_text(ratio, at_least=False)} ({step['8']:.1f} vs {step['1']:.1f} ms)",
                    "met" if ratio <= 1.6 else "not met"])
    roof = (edge.get("roofline") or {}).get("tokens_per_s")
    decode = single.get("loraplex[batched] int4 edge", {}).get("switching", {}).get("decode_tokens_per_s")
    if roof and decode:
        out.append(["int4 single stream, share of the bandwidth roofline", "≥ 45%", f"{decode / roof:.0%}",
                    "met" if decode / roof >= 0.45 else "not met"])
    acc = edge.get("accuracy") or {}

    def share(name: str) -> float | None:
        r = acc.get(name)
        total = sum(x.get("total", 0) for x in r.values()) if r else 0
        return sum(x.get("correct", 0) for x in r.values()) / total if total else None

    ours_a, theirs_a = share("loraplex[batched] int4"), share("llama.cpp Q4_1")
    if ours_a is not None and theirs_a is not None:
        gap = (theirs_a - ours_a) * 100
        out.append(["task accuracy, int4 vs llama.cpp Q4_1 (same examples)", "within 2 points",
                    f"{ours_a:.1%} vs {theirs_a:.1%} ({-gap:+.1f} points)", "met" if gap <= 2 else "not met"])
    return out


def render(edge: dict) -> list[str]:
    if not edge:
        return []
    lines = _header(edge)
    rows = targets(edge)
    if rows:
        load = edge.get("load_average")
        lines += ["### Edge targets", "", f"Load average (1 / 5 / 15 min) during this part: "
                  f"{load_average(load.get('start'))} at its start, {load_average(load.get('end'))} at its end."
                  if load else "", ""]
        lines += md_table(["target", "needs", "measured", "status"], rows)
    for section in (_single, _concurrency):
        lines += section(edge)
        if edge.get("passive"):
            lines += section({**edge, **edge["passive"]}, passive=True)
    for section in (_step_cost, _memory, _breakdown, _cold, _accuracy, _agreement):
        lines += section(edge)
    if edge.get("unavailable"):
        lines += ["Not available: " + "; ".join(f"{k}: {v[:160]}" for k, v in edge["unavailable"].items()), ""]
    return lines
