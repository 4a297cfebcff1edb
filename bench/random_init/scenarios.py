"""The random part's scenarios: single stream, adapter switch, concurrency, hot load.

Every scenario interleaves the systems it compares (round-robin per repetition or per grid
point), so that a shared machine's slow moments hit them all alike and
the ratios between systems stay meaningful even when the absolute times move.

A "system" is any object with `name`, `generate(prompt, adapter, new_tokens) -> RequestResult`,
`run_load(requests, clients, new_tokens) -> (results, wall_s, note)` and
`load_adapter(name, path) -> seconds`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.measure.results import Prompt, RequestResult, failure_line, guarded, median, over, summarize_load

log = logging.getLogger("bench.scenarios")


@dataclass
class Grid:
    """Request counts and grids: sized so the full bench ends in < 20 minutes on 2 cores."""

    single_reps: int = 12  # the int4 target's systems are a few % apart; 5 requests moved it by 5%
    switch_reps: int = 2
    switch_block: int = 4
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    adapter_spread: tuple[int, ...] = (1, 4, 8)
    min_requests: int = 8  # per grid point
    requests_per_client: float = 1.5  # per grid point: max(min_requests, clients x this)
    serial_measured: int = 6  # serial peers: requests measured per grid point (then replayed)
    peft_waves: int = 2
    hot_load_clients: int = 8
    hot_load_adapters: int = 4
    hot_load_requests: int = 16  # at least; clients go on until both loads are done
    hot_load_delay_s: float = 2.0  # load before the first Load RPC, and after each
    memory_counts: tuple[int, ...] = (1, 8, 32)
    # Seconds each scenario may take before its remaining points are skipped (and reported as
    # skipped): a safety net that keeps `make bench` under 20 minutes on a slow or shared machine.
    budget_s: dict = field(
        default_factory=lambda: {"single": 90, "switch": 100, "concurrency": 560, "hotload": 60, "memory": 180}
    )


def _requests(prompts: list[Prompt], adapters: list[str | None], n: int) -> list[tuple[Prompt, str | None]]:
    return [(prompts[i % len(prompts)], adapters[i % len(adapters)]) for i in range(n)]




def warm_up(systems: list[Any], prompt: Prompt, adapter: str | None, new_tokens: int) -> dict[str, list[int] | None]:
    """One request per system (not timed); returns each system's greedy completion ids."""
    tokens = {}
    for system in systems:
        result = guarded(system.name, "warm-up", system.generate, prompt, adapter, new_tokens)
        ok = not isinstance(result, Exception) and result.ok
        tokens[system.name] = result.token_ids if ok else None
    return tokens


def agreement(tokens: dict[str, list[int] | None], reference: str) -> dict[str, str]:
    """Whether each system's greedy completion equals the reference system's (same work, same answer)."""
    ref = tokens.get(reference)
    out = {}
    for name, ids in tokens.items():
        if ids is None or ref is None:
            out[name] = "unknown"
        elif ids == ref:
            out[name] = "same"
        else:
            first = next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b), min(len(ids), len(ref)))
            out[name] = f"differs from token {first}"
    return out


def single_stream(
    systems: list[Any],
    prompts: list[Prompt],
    adapter: str,
    new_tokens: int,
    reps: int,
    progress=None,
    deadline: float | None = None,
) -> dict[str, dict]:
    """Time to first token and tokens/s, one request at a time (streamed for gRPC clients)."""
    runs: dict[str, list[RequestResult]] = {s.name: [] for s in systems}
    errors: dict[str, str] = {}
    for rep in range(reps):
        if rep and over(deadline):
            log.warning("single stream: time budget used up after %d repetitions", rep)
            break
        for system in systems:
            result = guarded(
                system.name, "single stream", system.generate, prompts[rep % len(prompts)], adapter, new_tokens
            )
            if isinstance(result, Exception):
                errors[system.name] = failure_line(result)
            elif result.ok:
                runs[system.name].append(result)
            else:
                errors[system.name] = result.error
            if progress:
                progress.update(1)
    out = {}
    for name, results in runs.items():
        if not results:
            out[name] = {"error": errors.get(name, "no successful request")}
            continue
        decode = [(r.tokens - 1) / (r.latency_s - r.ttft_s) for r in results if r.ttft_s is not None and r.tokens > 1]
        out[name] = {
            "requests": len(results),
            "tokens": median([r.tokens for r in results]),
            "ttft_ms_p50": median([r.ttft_s for r in results if r.ttft_s is not None]) * 1000
            if any(r.ttft_s is not None for r in results)
            else None,
            "latency_ms_p50": median([r.latency_s for r in results]) * 1000,
            "tokens_per_s": median([r.tokens / r.latency_s for r in results]),
            "decode_tokens_per_s": median(decode) if decode else None,
        }
        overhead = [r.latency_s - r.server_total_s for r in results if r.server_total_s is not None]
        if overhead:
            out[name]["rpc_overhead_ms_p50"] = median(overhead) * 1000
    return out


def adapter_switch(
    systems: list[Any],
    prompts: list[Prompt],
    adapters: tuple[str, str],
    new_tokens: int,
    reps: int,
    block: int,
    progress=None,
    deadline: float | None = None,
) -> dict[str, dict]:
    """Serial requests on the same adapter vs alternating between two: what a switch costs."""
    patterns = {"same": [adapters[0]] * block, "alternating": [adapters[i % 2] for i in range(block)]}
    lat: dict[str, dict[str, list[float]]] = {s.name: {p: [] for p in patterns} for s in systems}
    for rep in range(reps):
        if rep and over(deadline):
            log.warning("adapter switch: time budget used up after %d repetitions", rep)
            break
        for system in systems:
            for pattern, sequence in patterns.items():
                for i, adapter in enumerate(sequence):
                    r = guarded(
                        system.name,
                        "adapter switch",
                        system.generate,
                        prompts[(rep + i) % len(prompts)],
                        adapter,
                        new_tokens,
                    )
                    if not isinstance(r, Exception) and r.ok:
                        lat[system.name][pattern].append(r.latency_s)
            if progress:
                progress.update(1)
    out = {}
    for name, by_pattern in lat.items():
        if not by_pattern["same"] or not by_pattern["alternating"]:
            out[name] = {"error": "requests failed"}
            continue
        same, alt = median(by_pattern["same"]), median(by_pattern["alternating"])
        out[name] = {
            "same_ms_p50": same * 1000,
            "alternating_ms_p50": alt * 1000,
            "switch_cost_ratio": alt / same,
            "requests": len(by_pattern["same"]) + len(by_pattern["alternating"]),
        }
    return out


def concurrency(
    systems: list[Any],
    prompts: list[Prompt],
    adapter_names: list[str],
    new_tokens: int,
    grid: Grid,
    progress=None,
    deadline: float | None = None,
) -> list[dict]:
    """Closed-loop clients over a spread of adapters: throughput and latency percentiles."""
    rows = []
    for n_adapters in grid.adapter_spread:
        spread = adapter_names[:n_adapters]
        for clients in grid.concurrency:
            n = max(grid.min_requests, int(clients * grid.requests_per_client))
            requests = _requests(prompts, spread, n)
            for system in systems:
                if over(deadline):
                    rows.append({"system": system.name, "adapters": n_adapters, "clients": clients,
                                 "error": "skipped: the scenario's time budget was used up"})
                    if progress:
                        progress.update(1)
                    continue
                kwargs = {}
                if getattr(system, "serial", False):
                    kwargs["max_measured"] = grid.serial_measured
                if getattr(system, "batched_peer", False):
                    kwargs["max_waves"] = grid.peft_waves
                got = guarded(
                    system.name,
                    f"concurrency {clients}x{n_adapters}",
                    system.run_load,
                    requests,
                    clients,
                    new_tokens,
                    **kwargs,
                )
                row = {"system": system.name, "adapters": n_adapters, "clients": clients}
                if isinstance(got, Exception):
                    row["error"] = failure_line(got)
                else:
                    results, wall, note = got
                    row.update(summarize_load(results, wall), note=note)
                    log.info(
                        "%-26s %2d clients x %d adapters: %7.1f tok/s p50 %.2fs p99 %.2fs failed %d",
                        system.name,
                        clients,
                        n_adapters,
                        row["tokens_per_s"],
                        row["p50_s"] or 0,
                        row["p99_s"] or 0,
                        row["failed"],
                    )
                rows.append(row)
                if progress:
                    progress.update(1)
    return rows


def hot_load(
    servers: list[Any],
    peers: list[Any],
    prompts: list[Prompt],
    adapter_names: list[str],
    new_adapter: tuple[str, Any],
    replacement: tuple[str, Any],
    peer_paths: dict[str, Any],
    new_tokens: int,
    grid: Grid,
    progress=None,
) -> dict[str, dict]:
    """Load a new adapter and replace one in use while clients keep sending requests.

    Servers get the Load RPCs from a separate thread in the middle of a closed-loop run; peers
    (in process, serial) can only load between requests, so for them the load time is the
    whole story: their requests wait for it.
    """
    out: dict[str, dict] = {}
    spread = adapter_names[: grid.hot_load_adapters]
    requests = _requests(prompts, spread, grid.hot_load_requests)
    for server in servers:
        loads: dict[str, float | str] = {}
        done = threading.Event()

        def admin(server=server, loads=loads, done=done) -> None:
            time.sleep(grid.hot_load_delay_s)  # let the load ramp up first
            try:
                for label, (name, path) in (("load_new", new_adapter), ("replace_in_use", replacement)):
                    try:
                        loads[label] = server.load_adapter(name, path)
                    except Exception as exc:
                        loads[label] = f"failed: {failure_line(exc)}"
                    time.sleep(grid.hot_load_delay_s)  # requests run on the new version for a while
            finally:
                done.set()

        thread = threading.Thread(target=admin, daemon=True)
        thread.start()
        got = guarded(server.name, "hot load", server.run_load, requests, grid.hot_load_clients, new_tokens, until=done)
        thread.join()
        row: dict[str, Any] = {"kind": "server, under load"}
        for label, value in loads.items():
            row[f"{label}_ms"] = value * 1000 if isinstance(value, float) else value
        if isinstance(got, Exception):
            row["error"] = failure_line(got)
        else:
            results, wall, _ = got
            row.update(
                requests=len(results),
                failed=sum(not r.ok for r in results),
                tokens_per_s=sum(r.tokens for r in results if r.ok) / wall,
            )
        after = guarded(server.name, "hot load check", server.generate, prompts[0], new_adapter[0], 2)
        row["new_adapter_serves"] = not isinstance(after, Exception) and after.ok
        out[server.name] = row
        if progress:
            progress.update(1)
    for peer in peers:
        name = new_adapter[0]
        took = guarded(peer.name, "hot load", peer.load_adapter, name, peer_paths[peer.name])
        row = {"kind": "in process, between requests"}
        if isinstance(took, Exception):
            row["error"] = repr(took)
        else:
            row["load_new_ms"] = took * 1000
        after = guarded(peer.name, "hot load check", peer.generate, prompts[0], name, 2)
        row["new_adapter_serves"] = not isinstance(after, Exception) and after.ok
        out[peer.name] = row
        if progress:
            progress.update(1)
    return out
