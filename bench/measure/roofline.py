"""Batch-1 memory-bandwidth roofline: the fastest any engine can decode one stream.

Decoding one token reads every weight once, so tokens/s <= copy bandwidth / weight bytes per
token. The bandwidth is measured here, in the same run, with numpy copies of a buffer far
larger than the last-level cache (a copy reads and writes each byte: 2 x size per copy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Bandwidth:
    gb_per_s: float  # best of the repeats (what the memory system can do)
    median_gb_per_s: float  # typical, on a shared machine
    buffer_mb: int


def measure_copy_bandwidth(buffer_mb: int = 512, repeats: int = 7) -> Bandwidth:
    """Copy bandwidth (read + write bytes per second) of one thread, as numpy's memcpy sees it."""
    import numpy as np

    n = buffer_mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        elapsed = time.perf_counter() - start
        rates.append(2 * src.nbytes / elapsed / 1e9)
    rates.sort()
    return Bandwidth(gb_per_s=rates[-1], median_gb_per_s=rates[len(rates) // 2], buffer_mb=buffer_mb)


def roofline_tokens_per_s(bytes_per_token: int, bandwidth: Bandwidth) -> float:
    return bandwidth.gb_per_s * 1e9 / bytes_per_token


def weight_bytes_per_token(package: Path, with_adapter: bool = True) -> dict[str, int]:
    """Bytes of weights one batch-1 decode step reads: every initializer except the embedding
    table (a gather reads one row), plus one adapter's LoRA weights (graph inputs)."""
    import onnx
    from loraplex.adapters.package.manifest import Manifest

    manifest = Manifest.load(package)
    model = onnx.load(str(package / manifest.model_file), load_external_data=False)
    itemsize = {
        onnx.TensorProto.FLOAT: 4,
        onnx.TensorProto.FLOAT16: 2,
        onnx.TensorProto.UINT8: 1,
        onnx.TensorProto.INT8: 1,
        onnx.TensorProto.INT32: 4,
        onnx.TensorProto.INT64: 8,
    }
    weights = embedding = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        size = n * itemsize.get(init.data_type, 4)
        if "embed_tokens" in init.name:
            embedding += size
        else:
            weights += size
    adapter = 0
    if with_adapter and manifest.adapters:
        first = next(iter(manifest.adapters.values()))
        adapter = (package / first.file).stat().st_size
    return {"weights": weights, "embedding": embedding, "adapter": adapter, "per_token": weights + adapter}
