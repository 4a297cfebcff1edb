"""The `batched` engine: requests for different adapters decode together, on onnxruntime.

- `graph`: rewrites the package graph so each row picks its adapter from weight banks (cached);
- `scheduler` (+ `slots`): which rows run, admission, adapter slots (LRU, drain), retirement;
- `runner` (+ `bank`, `kv`, `sampling`): the session run, the weight banks, the KV cache, token choice;
- `executor`: one step is schedule -> run -> postprocess; `BatchedEngine` runs it on the engine core.
"""

from loraplex.runtime.engines.batched.executor import BatchedEngine

__all__ = ["BatchedEngine"]
