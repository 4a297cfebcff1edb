"""Which execution provider an engine runs on, checked against this machine at start.

The table of devices and providers is the package contract's (loraplex.adapters.package.devices).
A provider this build lacks fails at once with what is available, never a silent CPU fallback.
"""

from __future__ import annotations

from loraplex.adapters.package.devices import PROVIDERS as PROVIDERS
from loraplex.adapters.package.devices import DeviceError, Provider, resolve_provider
from loraplex.runtime.errors import DeviceUnavailable


def available_providers() -> list[str]:
    """Providers that can run here ("cpu" always): ONNX Runtime must list the execution provider and
    onnxruntime-genai must be built for it. (onnxruntime-genai 0.18's `is_qnn_available`,
    `is_openvino_available` and `is_webgpu_available` answer True on the plain CPU wheel, so its
    probes alone would let a server start on a provider that fails at the first session.)"""
    import onnxruntime as ort
    import onnxruntime_genai as og

    listed = set(ort.get_available_providers())
    found = ["cpu"]
    for provider in PROVIDERS.values():
        if provider.probe is None or provider.ort_name not in listed:
            continue
        check = getattr(og, provider.probe, None)
        try:
            if check is None or check():
                found.append(provider.name)
        except Exception:  # a probe of a missing runtime library raises instead of answering False
            continue
    return found


def choose(device: str = "cpu", provider: str | None = None) -> Provider:
    """Resolve --device/--provider and check the provider exists on this machine."""
    try:
        chosen = resolve_provider(device, provider)
    except DeviceError as exc:
        raise DeviceUnavailable(str(exc)) from exc
    have = available_providers()
    if chosen.name not in have:
        raise DeviceUnavailable(
            f"execution provider {chosen.name!r} (device {device}) is not available on this machine; "
            f"available: {', '.join(have)}. To get it: {chosen.install_hint}"
        )
    return chosen


def apply(og_config, provider: Provider) -> None:
    """Point an og.Config at the chosen provider (CPU = no provider entries)."""
    og_config.clear_providers()
    if provider.name != "cpu":
        og_config.append_provider(provider.genai_name)
