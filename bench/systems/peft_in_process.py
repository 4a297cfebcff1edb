"""Peer 3: PyTorch + PEFT, what a user runs without an inference server.

All adapters live in one `PeftModel`. Serial requests call `set_adapter` per request; the
concurrent scenarios use PEFT's mixed-adapter batch (`generate(..., adapter_names=[...])`),
one static batch per wave of clients. EOS is ignored with `min_new_tokens == max_new_tokens`.
All bench prompts have the same length, so batches need no padding.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.measure.results import Prompt, RequestResult

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class _FirstTokenClock:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self, start: float):
        self.start = start
        self.calls = 0
        self.ttft: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.ttft is None:  # the first put() is the prompt
            self.ttft = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class PeftSystem:
    name = "pytorch-peft"
    batched_peer = True  # concurrency scenarios use mixed-adapter static batches

    def __init__(self, base: Path, peft_dirs: dict[str, Path], threads: int | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self._torch = torch
        torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.generation_config.pad_token_id = model.config.pad_token_id
        names = list(peft_dirs)
        self.model = PeftModel.from_pretrained(model, peft_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(peft_dirs[name], adapter_name=name)
        self.model.eval()

    def load_adapter(self, name: str, path: Path) -> float:
        start = time.perf_counter()
        self.model.load_adapter(path, adapter_name=name)
        return time.perf_counter() - start

    def _generate(self, input_ids, new_tokens: int, **kwargs):
        with self._torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=self._torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                **kwargs,
            )

    def generate(self, prompt: Prompt, adapter: str | None, new_tokens: int) -> RequestResult:
        """One request, serial: `set_adapter` then greedy generate."""
        start = time.perf_counter()
        input_ids = self._torch.tensor([prompt.ids])
        clock = _FirstTokenClock(start)
        if adapter:
            self.model.set_adapter(adapter)
            out = self._generate(input_ids, new_tokens, streamer=clock)
        else:
            with self.model.disable_adapter():
                out = self._generate(input_ids, new_tokens, streamer=clock)
        ids = out[0, len(prompt.ids) :].tolist()
        return RequestResult(latency_s=time.perf_counter() - start, ttft_s=clock.ttft, tokens=len(ids), token_ids=ids)

    def generate_batch(
        self, prompts: list[list[int]], adapters: list[str | None], new_tokens: int
    ) -> list[RequestResult]:
        """One mixed-adapter static batch: every request finishes when the batch does."""
        start = time.perf_counter()
        input_ids = self._torch.tensor(prompts)
        names = [a or BASE_ADAPTER for a in adapters]
        out = self._generate(input_ids, new_tokens, adapter_names=names)
        elapsed = time.perf_counter() - start
        tokens = out.shape[1] - len(prompts[0])
        return [RequestResult(latency_s=elapsed, ttft_s=None, tokens=tokens) for _ in prompts]

    def run_load(
        self, requests: list[tuple[Prompt, str | None]], clients: int, new_tokens: int, max_waves: int = 2
    ) -> tuple[list[RequestResult], float, str]:
        """Mixed-adapter static batches of `clients` requests, one wave after another."""
        waves = [requests[i : i + clients] for i in range(0, len(requests), clients)][:max_waves]
        results: list[RequestResult] = []
        wall = 0.0
        for wave in waves:
            batch = self.generate_batch([p.ids for p, _ in wave], [a for _, a in wave], new_tokens)
            for r in batch:
                r.start_s = wall
            wall += batch[0].latency_s
            results.extend(batch)
        return results, wall, f"static mixed-adapter batches of `clients` requests, up to {max_waves} batches measured"

    def close(self) -> None:
        del self.model
