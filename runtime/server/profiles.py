"""`--profile`: server presets for where loraplex runs; any option given explicitly overrides them.

- `default`: a server with cores to itself. Batches up to 8 requests; onnxruntime's CPU arena keeps
  the largest activations it ever held (no allocation on the hot path); every adapter is warmed up
  before health says SERVING.
- `edge`: a small device (phone, single-board computer, a laptop running other things): memory and
  start-up first. Batches up to 4 requests, no arena (memory goes back after a prefill), only the
  base model is warmed up (each adapter's file is still read and checked at start; its first
  request fills its bank slot, about a millisecond), threads share one malloc arena
  (`runtime.engines.heap`: less fragmented memory per adapter), and the batched engine's prefix
  cache keeps 16 MiB of prompt prefixes' KV instead of 64 (on SmolLM2-135M about 350 tokens: a
  chat's history or a few templates; each adapter's prefixes count apart).
Both allocate adapter bank slots only as adapters arrive (`runtime.engines.batched.bank`).

Threads, in both: onnxruntime's idle threads spin `BRIEF_SPIN_US` before they sleep. Measured on
SmolLM2-135M int4, one stream, 2 threads on 2 cores, tokens/s alone / beside a process that keeps
one core busy: sleeping at once 70-76 / 80-90; onnxruntime's own spinning 97-99 / 51-56 (a spinning
thread takes the other process's core and is preempted mid-step); 20 us 98 / 70 (and the other
process keeps its share). `--spin` spins as onnxruntime likes (a device whose cores are all
loraplex's), `--no-spin` sleeps at once.
"""

from __future__ import annotations

from dataclasses import dataclass

BRIEF_SPIN_US = 20  # onnxruntime's idle threads spin this long, then sleep (see the module doc)


@dataclass(frozen=True)
class Profile:
    name: str
    max_batch: int  # requests decoding at once (the KV cache holds this many rows)
    max_queue: int  # requests waiting beyond max_batch before RESOURCE_EXHAUSTED
    intra_op_threads: int  # onnxruntime's threads (0 = one per physical core)
    allow_spinning: bool  # onnxruntime's idle threads busy-wait between parallel sections
    memory_arena: bool  # onnxruntime's CPU arena (keeps its high-water mark of activations)
    warm_adapters: bool  # warm every adapter at start (else the base model only)
    malloc_arenas: int  # glibc malloc arenas for the server's threads (0: glibc's default, 8 per core)
    prefix_cache_mib: float | None = None  # batched engine: the prefix cache's bound (None: the engine's, 64)
    spin_us: int | None = None  # with spinning: how long an idle thread spins before it sleeps (None: onnxruntime's)


PROFILES = {
    "default": Profile("default", max_batch=8, max_queue=64, intra_op_threads=0, allow_spinning=True,
                       memory_arena=True, warm_adapters=True, malloc_arenas=0, spin_us=BRIEF_SPIN_US),
    "edge": Profile("edge", max_batch=4, max_queue=16, intra_op_threads=0, allow_spinning=True,
                    memory_arena=False, warm_adapters=False, malloc_arenas=1, prefix_cache_mib=16,
                    spin_us=BRIEF_SPIN_US),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"profile {name!r} is unknown; choose one of {', '.join(PROFILES)}") from None
