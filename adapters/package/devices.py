"""Devices and execution providers: the one table that export (which provider a package's
genai_config asks for) and the server (which provider to start) both read.

Known adapter limits, stated rather than failing obscurely: DirectML cannot load LoRA adapters
(onnxruntime-genai issue 1181); QNN runs LoRA only through precompiled EP-context models.
Only the CPU is exercised by loraplex's tests; the other rows are untested here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

Device = Literal["cpu", "gpu", "npu"]
DEVICES: tuple[Device, ...] = ("cpu", "gpu", "npu")


@dataclass(frozen=True)
class Provider:
    name: str  # what --provider takes
    devices: tuple[Device, ...]  # the --device values it serves
    ort_name: str  # onnxruntime's execution provider name
    genai_name: str  # onnxruntime-genai's Config.append_provider name
    config_key: str  # key in genai_config.json's provider_options
    config_options: dict[str, str] = field(default_factory=dict)
    probe: str | None = None  # onnxruntime-genai's is_*_available function
    install_hint: str = ""
    adapter_limit: str | None = None  # why adapters do not (fully) work on it


_QNN_BACKEND = "QnnHtp.dll" if os.name == "nt" else "libQnnHtp.so"
PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("cpu", ("cpu",), "CPUExecutionProvider", "cpu", "cpu", install_hint="pip install loraplex"),
        Provider("cuda", ("gpu",), "CUDAExecutionProvider", "cuda", "cuda", probe="is_cuda_available",
                 install_hint="pip install 'loraplex[cuda]' (onnxruntime-genai-cuda) on a machine with an NVIDIA GPU"),
        Provider("dml", ("gpu",), "DmlExecutionProvider", "dml", "dml", probe="is_dml_available",
                 install_hint="pip install 'loraplex[directml]' on Windows",
                 adapter_limit="DirectML cannot load LoRA adapters (onnxruntime-genai issue 1181): it serves the "
                 "base model only; use cpu or cuda to serve adapters"),
        Provider("qnn", ("npu",), "QNNExecutionProvider", "QNN", "qnn", {"backend_path": _QNN_BACKEND},
                 probe="is_qnn_available", install_hint="pip install 'loraplex[qnn]' on a Snapdragon device",
                 adapter_limit="QNN runs LoRA only through precompiled EP-context models: export for npu with the "
                 "adapters included, and serve adapters on cpu meanwhile"),
        Provider("openvino", ("gpu", "npu"), "OpenVINOExecutionProvider", "OpenVINO", "OpenVINO",
                 probe="is_openvino_available", install_hint="pip install 'loraplex[openvino]'"),
        Provider("webgpu", ("gpu",), "WebGpuExecutionProvider", "WebGPU", "WebGPU", probe="is_webgpu_available",
                 install_hint="use an onnxruntime-genai build with WebGPU"),
    )
}
DEFAULT_PROVIDER: dict[Device, str] = {"cpu": "cpu", "gpu": "cuda", "npu": "qnn"}


class DeviceError(ValueError):
    """An unknown device or provider, or a provider that does not serve the device."""


def resolve_provider(device: str, provider: str | None = None) -> Provider:
    """The provider for `device` (its default when `provider` is None), checked against the table."""
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is unknown; choose one of {', '.join(DEVICES)}")
    name = (provider or DEFAULT_PROVIDER[device]).lower()
    chosen = PROVIDERS.get(name)
    if chosen is None:
        others = ", ".join(p for p in PROVIDERS if p != "cpu")
        raise DeviceError(f"provider {name!r} is unknown; choose one of {others}")
    if device not in chosen.devices:
        serves = " or ".join(chosen.devices)
        raise DeviceError(f"--provider {name} needs --device {serves}, not {device}")
    return chosen
