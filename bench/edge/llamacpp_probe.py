"""llama-cpp-python in a fresh process: start to first token, and RSS with N adapters.

`python -m bench.edge.llamacpp_probe MODEL.gguf THREADS PROMPT_IDS_JSON [ADAPTER.gguf ...]` (run with
the environment `LlamaCpp.env()` gives): imports llama_cpp, loads the model and the adapters, runs
one request on the first adapter (or the base) and prints one JSON line with the seconds from
process start (the interpreter's own start, from /proc) to the first token, and the RSS after one
1-token request on each adapter: what a Python service built on llama-cpp-python holds.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time


def _process_age_s() -> float:
    """Seconds since this process started (the kernel's start time, so interpreter start-up counts)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    _, model, threads, prompt_json, *adapters = argv
    prompt = json.loads(prompt_json)
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=512, n_threads=int(threads), n_threads_batch=int(threads), verbose=False)
    handles = []
    for path in adapters:
        handle = llama_cpp.llama_adapter_lora_init(llm._model.model, path.encode())
        if not handle:
            raise SystemExit(f"llama.cpp could not load {path}")
        handles.append(handle)

    def use(index: int | None) -> None:
        if index is None:
            llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handles[index])
            llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        llm.reset()

    use(0 if handles else None)
    next(iter(llm.generate(prompt, temp=0.0, top_k=1)))
    first_token_s = _process_age_s()
    first_token_cpu_s = time.process_time()
    for index in [None, *range(len(handles))]:
        use(index)
        next(iter(llm.generate(prompt, temp=0.0, top_k=1)))
    import psutil

    print(json.dumps({"first_token_s": first_token_s, "first_token_cpu_s": first_token_cpu_s,
                      "rss": psutil.Process().memory_info().rss,
                      "adapters": len(handles), "measured_at": time.time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
