"""Device and execution-provider selection for onnxruntime-genai, checked at start.

`--device` picks a default provider, `--provider` names one. A provider this onnxruntime-genai
build lacks fails at once with what is available (rather than falling back to the CPU silently).
Known adapter limits (README "Devices"): DirectML cannot load LoRA adapters (onnxruntime-genai
issue 1181); QNN runs LoRA only through precompiled EP-context models.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.runtime.errors import DeviceUnavailable

DEVICES = ("cpu", "gpu", "npu")
PROVIDERS = ("cpu", "cuda", "dml", "qnn", "openvino", "webgpu")
DEFAULT_PROVIDER = {"cpu": "cpu", "gpu": "cuda", "npu": "qnn"}
# Names onnxruntime-genai's Config.append_provider takes.
GENAI_NAMES = {"cuda": "cuda", "dml": "dml", "qnn": "QNN", "openvino": "OpenVINO", "webgpu": "WebGPU"}
# Which onnxruntime-genai availability probe answers for a provider.
PROBES = {
    "cuda": "is_cuda_available",
    "dml": "is_dml_available",
    "qnn": "is_qnn_available",
    "openvino": "is_openvino_available",
    "webgpu": "is_webgpu_available",
}
ORT_NAMES = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
INSTALL_HINT = {
    "cuda": "pip install 'loraplex[cuda]' (onnxruntime-genai-cuda) on a machine with an NVIDIA GPU",
    "dml": "pip install 'loraplex[directml]' on Windows",
    "qnn": "pip install 'loraplex[qnn]' on a Snapdragon device",
    "openvino": "pip install 'loraplex[openvino]'",
    "webgpu": "use an onnxruntime-genai build with WebGPU",
}
ADAPTER_LIMITS = {
    "dml": "DirectML cannot load LoRA adapters (onnxruntime-genai issue 1181): serve the base model, or use cpu/cuda",
    "qnn": "QNN runs LoRA only through precompiled EP-context models: export for npu with the adapters included",
}


@dataclass(frozen=True)
class DeviceChoice:
    device: str
    provider: str  # one of PROVIDERS

    @property
    def adapter_limit(self) -> str | None:
        return ADAPTER_LIMITS.get(self.provider)


def available_providers() -> list[str]:
    """Providers that can run here ("cpu" always): ONNX Runtime must list the execution provider and
    onnxruntime-genai must be built for it. (onnxruntime-genai 0.18's `is_qnn_available`,
    `is_openvino_available` and `is_webgpu_available` answer True on the plain CPU wheel, so its
    probes alone would let a server start on a provider that fails at the first session.)"""
    import onnxruntime as ort
    import onnxruntime_genai as og

    listed = set(ort.get_available_providers())
    found = ["cpu"]
    for provider, probe in PROBES.items():
        if ORT_NAMES[provider] not in listed:
            continue
        check = getattr(og, probe, None)
        try:
            if check is None or check():
                found.append(provider)
        except Exception:  # a probe of a missing runtime library raises instead of answering False
            continue
    return found


def choose(device: str = "cpu", provider: str | None = None) -> DeviceChoice:
    """Resolve --device/--provider and check the provider exists on this machine."""
    if device not in DEVICES:
        raise DeviceUnavailable(f"device {device!r} is unknown; choose one of {', '.join(DEVICES)}")
    provider = (provider or DEFAULT_PROVIDER[device]).lower()
    if provider not in PROVIDERS:
        raise DeviceUnavailable(f"provider {provider!r} is unknown; choose one of {', '.join(PROVIDERS[1:])}")
    if device == "cpu" and provider != "cpu":
        raise DeviceUnavailable(f"--provider {provider} needs --device gpu or npu, not cpu")
    have = available_providers()
    if provider not in have:
        raise DeviceUnavailable(
            f"execution provider {provider!r} (device {device}) is not available on this machine; "
            f"available: {', '.join(have)}. To get it: {INSTALL_HINT[provider]}"
        )
    return DeviceChoice(device, provider)


def apply(og_config, choice: DeviceChoice) -> None:
    """Point an og.Config at the chosen provider (CPU = no provider entries)."""
    og_config.clear_providers()
    if choice.provider != "cpu":
        og_config.append_provider(GENAI_NAMES[choice.provider])
