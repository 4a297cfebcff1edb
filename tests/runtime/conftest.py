"""Shared by the runtime tests: an adapter root holding good, bad and escaping adapter files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def write_adapter(path: Path, params: dict) -> Path:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    adapter.export_adapter(str(path))
    return path


def read_adapter(path: Path) -> dict:
    import onnxruntime as ort

    return {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_package: Path) -> Path:
    """root/: alpha, beta, gamma copies; garbage, wrong-shape and A-without-B files; a symlink out of root."""
    import numpy as np

    base = tmp_path_factory.mktemp("adapter_root")
    root = base / "root"
    root.mkdir()
    for name in ("alpha", "beta", "gamma"):
        shutil.copy(tiny_package / "adapters" / f"{name}.onnx_adapter", root / f"{name}.onnx_adapter")
    (root / "garbage.onnx_adapter").write_bytes(os.urandom(4096))
    (root / "notes.txt").write_text("not an adapter")
    params = read_adapter(root / "alpha.onnx_adapter")
    wrong = {k: np.zeros((v.shape[0] + 1, v.shape[1]), np.float32) for k, v in params.items()}
    write_adapter(root / "wrong_shape.onnx_adapter", wrong)
    a_only = next(k for k in sorted(params) if ".lora_A." in k)  # an A without its B cannot run
    write_adapter(root / "partial.onnx_adapter", {a_only: params[a_only]})
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(root / "alpha.onnx_adapter", outside / "alpha.onnx_adapter")
    (root / "escape.onnx_adapter").symlink_to(outside / "alpha.onnx_adapter")
    return root
