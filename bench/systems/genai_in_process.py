"""Peer 2: onnxruntime-genai in process, one generator per request, serial.

The floor that loraplex's gRPC layer adds overhead to: the same package, the same graph, no
server. EOS is ignored by setting `min_length` to `max_length` (onnxruntime-genai then masks
EOS until the last position), so every request decodes exactly `new_tokens` tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.measure.results import Prompt, RequestResult, replay_serial_queue


class GenaiInProcess:
    serial = True  # concurrency scenarios replay its measured service times (scenarios.concurrency)

    def __init__(self, package: Path, adapter_names: list[str], name: str = "onnxruntime-genai"):
        import onnxruntime_genai as og
        from loraplex.adapters.package.manifest import Manifest

        self._og = og
        self.name = name
        self.package = package
        manifest = Manifest.load(package)
        self.model = og.Model(str(package))
        self.adapters = og.Adapters(self.model)
        self.loaded: list[str] = []
        self._measured: dict[tuple, list[RequestResult]] = {}
        for name in adapter_names:
            self.load_adapter(name, package / manifest.adapters[name].file)

    def load_adapter(self, name: str, path: Path) -> float:
        """Load one adapter; returns the seconds it took."""
        start = time.perf_counter()
        self.adapters.load(str(path), name)
        self.loaded.append(name)
        return time.perf_counter() - start

    def generate(self, prompt: Prompt, adapter: str | None, new_tokens: int) -> RequestResult:
        og = self._og
        prompt_ids = prompt.ids
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        total = len(prompt_ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(self.model, params)
        if adapter:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(prompt_ids)
        ttft = None
        ids: list[int] = []
        while not generator.is_done() and len(ids) < new_tokens:
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
            if ttft is None:
                ttft = time.perf_counter() - start
        del generator
        return RequestResult(latency_s=time.perf_counter() - start, ttft_s=ttft, tokens=len(ids), token_ids=ids)

    def close(self) -> None:
        del self.adapters
        del self.model

    def run_load(
        self, requests: list[tuple[Prompt, str | None]], clients: int, new_tokens: int, max_measured: int = 8
    ) -> tuple[list[RequestResult], float, str]:
        """Serial service: measure up to `max_measured` requests one by one, replay the closed loop.

        A serial server's service times do not depend on how many clients wait, so the same
        requests (same prompts, same adapters) are measured once and replayed for every client count.
        """
        sample = requests[:max_measured]
        key = (new_tokens, tuple((p.text, a) for p, a in sample))
        if key not in self._measured:
            self._measured[key] = [self.generate(p, a, new_tokens) for p, a in sample]
        measured = self._measured[key]
        results, wall = replay_serial_queue(
            [r.latency_s for r in measured], [r.tokens for r in measured], clients, len(requests)
        )
        note = f"serial; {len(measured)} requests measured once per adapter spread, replayed as a FIFO queue"
        return results, wall, note
