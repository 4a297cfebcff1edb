"""Device targets: which execution provider a package's `genai_config.json` asks for.

The builder writes a CPU (or CUDA) config; export rewrites `provider_options` so the server's
onnxruntime-genai picks the right provider without flags. DirectML and QNN have adapter limits
(DESIGN.md): export warns about them instead of letting the server fail obscurely later.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu", "npu")
DEFAULT_PROVIDER = {"cpu": None, "gpu": "cuda", "npu": "qnn"}
# provider -> (genai_config provider_options key, options)
PROVIDERS: dict[str, tuple[str, dict[str, str]]] = {
    "cuda": ("cuda", {}),
    "dml": ("dml", {}),
    "qnn": ("qnn", {"backend_path": "QnnHtp.dll" if os.name == "nt" else "libQnnHtp.so"}),
    "openvino": ("OpenVINO", {}),
    "webgpu": ("WebGPU", {}),
}
PROVIDER_DEVICES = {"cuda": "gpu", "dml": "gpu", "webgpu": "gpu", "openvino": "npu", "qnn": "npu"}
ADAPTER_LIMITS = {
    "dml": "DirectML cannot load LoRA adapters in onnxruntime-genai 0.18 (onnxruntime-genai issue 1181): "
    "the package will serve the base model only on DirectML; use CUDA or CPU to serve adapters",
    "qnn": "QNN supports LoRA only through precompiled EP-context models; this package's adapters run on "
    "QNN only after compiling an EP-context model per adapter set; serve adapters on CPU meanwhile",
}


def resolve_provider(device: str, provider: str | None = None) -> str | None:
    """The provider for `device` (None = CPU), checked; warns about known adapter limits."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not supported; choose one of {', '.join(DEVICES)}")
    provider = provider or DEFAULT_PROVIDER[device]
    if provider is None:
        return None
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not supported; choose one of {', '.join(PROVIDERS)}")
    if PROVIDER_DEVICES[provider] != device:
        raise ValueError(f"provider {provider!r} targets device {PROVIDER_DEVICES[provider]!r}, not {device!r}")
    if provider in ADAPTER_LIMITS:
        log.warning("%s", ADAPTER_LIMITS[provider])
    return provider


def write_provider(genai_config: Path, provider: str | None) -> None:
    """Set the decoder's provider_options in `genai_config.json` (empty list = CPU)."""
    config = json.loads(genai_config.read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    if provider is None:
        session["provider_options"] = []
    else:
        key, options = PROVIDERS[provider]
        session["provider_options"] = [{key: dict(options)}]
    tmp = genai_config.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=4) + "\n")
    tmp.replace(genai_config)
