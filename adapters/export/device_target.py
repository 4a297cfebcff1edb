"""Device targets: which execution provider a package's `genai_config.json` asks for.

The builder writes a CPU (or CUDA) config; export rewrites `provider_options` so the server's
onnxruntime-genai picks the right provider without flags. The providers are the package
contract's table (loraplex.adapters.package.devices); for DirectML and QNN, whose adapter limits
are known, export warns instead of letting the server fail obscurely later.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loraplex.adapters.package.devices import DeviceError, resolve_provider

log = logging.getLogger(__name__)


def export_provider(device: str, provider: str | None = None) -> str | None:
    """The provider a package for `device` names (None = CPU), checked; warns about adapter limits."""
    try:
        chosen = resolve_provider(device, provider)
    except DeviceError as exc:
        raise ValueError(str(exc)) from exc
    if chosen.adapter_limit:
        log.warning("%s", chosen.adapter_limit)
    return None if chosen.name == "cpu" else chosen.name


def write_provider(genai_config: Path, provider: str | None) -> None:
    """Set the decoder's provider_options in `genai_config.json` (empty list = CPU)."""
    from loraplex.adapters.package.devices import PROVIDERS

    config = json.loads(genai_config.read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    if provider is None:
        session["provider_options"] = []
    else:
        chosen = PROVIDERS[provider]
        session["provider_options"] = [{chosen.config_key: dict(chosen.config_options)}]
    tmp = genai_config.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=4) + "\n")
    tmp.replace(genai_config)
