"""Shared by the runtime tests: an adapter root holding good, bad and escaping adapter files.

Files the tests mean to reach the graph checks carry a recorded sha256 beside them
(`<file>.sha256`, as `sha256sum` writes it); copies of the package's own adapters need none (the
manifest records their digest).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest


def write_adapter(path: Path, params: dict, record: bool = True) -> Path:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    adapter.export_adapter(str(path))
    if record:
        record_digest(path)
    return path


def record_digest(path: Path, digest: str | None = None) -> Path:
    """`<path>.sha256` in sha256sum's format (the file's own digest unless one is given)."""
    digest = digest or hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.write_text(f"{digest}  {path.name}\n")
    return sidecar


def read_adapter(path: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))  # the arrays view its memory: copy while it lives
    return {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_package: Path) -> Path:
    """root/: alpha, beta, gamma copies; garbage, wrong-shape, A-without-B, NaN, huge, float16, int32,
    byte-flipped and unrecorded files; a symlink out of root and a symlink loop."""
    import numpy as np

    base = tmp_path_factory.mktemp("adapter_root")
    root = base / "root"
    root.mkdir()
    for name in ("alpha", "beta", "gamma"):
        shutil.copy(tiny_package / "adapters" / f"{name}.onnx_adapter", root / f"{name}.onnx_adapter")
    (root / "garbage.onnx_adapter").write_bytes(os.urandom(4096))
    record_digest(root / "garbage.onnx_adapter")
    (root / "notes.txt").write_text("not an adapter")
    params = read_adapter(root / "alpha.onnx_adapter")
    wrong = {k: np.zeros((v.shape[0] + 1, v.shape[1]), np.float32) for k, v in params.items()}
    write_adapter(root / "wrong_shape.onnx_adapter", wrong)
    a_only = next(k for k in sorted(params) if ".lora_A." in k)  # an A without its B cannot run
    write_adapter(root / "partial.onnx_adapter", {a_only: params[a_only]})
    first = sorted(params)[0]
    for file, value in (("nan", np.nan), ("huge", 1e30)):
        poisoned = {k: v.copy() for k, v in params.items()}
        poisoned[first].flat[0] = value
        write_adapter(root / f"{file}.onnx_adapter", poisoned)
    write_adapter(root / "half.onnx_adapter", {k: v.astype(np.float16) for k, v in params.items()})
    write_adapter(root / "ints.onnx_adapter", {k: (v * 100).astype(np.int32) for k, v in params.items()})
    flipped = bytearray((root / "alpha.onnx_adapter").read_bytes())
    for i in range(len(flipped) // 2, len(flipped) // 2 + 64, 8):
        flipped[i] ^= 0x5A
    (root / "flipped.onnx_adapter").write_bytes(bytes(flipped))
    record_digest(root / "flipped.onnx_adapter", hashlib.sha256((root / "alpha.onnx_adapter").read_bytes()).hexdigest())
    write_adapter(root / "unrecorded.onnx_adapter", {k: v * 0.5 for k, v in params.items()}, record=False)
    write_adapter(root / "alpha_half.onnx_adapter", {k: v * 0.5 for k, v in params.items()})  # valid, recorded
    shutil.copy(root / "alpha.onnx_adapter", root / "badsum.onnx_adapter")
    (root / "badsum.onnx_adapter.sha256").write_text("not a digest\n")
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(root / "alpha.onnx_adapter", outside / "alpha.onnx_adapter")
    (root / "escape.onnx_adapter").symlink_to(outside / "alpha.onnx_adapter")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    return root
