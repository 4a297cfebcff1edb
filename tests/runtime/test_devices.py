"""Device/provider selection: a provider this machine lacks fails at start, listing what is available."""

from __future__ import annotations

import pytest
from loraplex.adapters.package.devices import DEFAULT_PROVIDER, PROVIDERS
from loraplex.runtime.engines import devices
from loraplex.runtime.errors import DeviceUnavailable


def test_cpu_is_always_available():
    assert devices.choose("cpu") is PROVIDERS["cpu"]
    assert "cpu" in devices.available_providers()


@pytest.mark.parametrize(("device", "provider"), [("gpu", None), ("gpu", "dml"), ("npu", None), ("gpu", "openvino")])
def test_missing_provider_fails_listing_the_available_ones(device, provider):
    wanted = provider or DEFAULT_PROVIDER[device]
    if wanted in devices.available_providers():
        pytest.skip(f"{wanted} is present on this machine")
    with pytest.raises(DeviceUnavailable) as err:
        devices.choose(device, provider)
    message = str(err.value)
    assert f"'{wanted}'" in message and "available: cpu" in message and "pip install" in message


def test_unknown_device_or_provider_or_mismatch_is_refused():
    with pytest.raises(DeviceUnavailable, match="device 'tpu'"):
        devices.choose("tpu")
    with pytest.raises(DeviceUnavailable, match="provider 'rocm'"):
        devices.choose("gpu", "rocm")
    with pytest.raises(DeviceUnavailable, match="--provider cuda needs --device gpu, not cpu"):
        devices.choose("cpu", "cuda")


def test_known_adapter_limits_are_stated():
    assert "1181" in PROVIDERS["dml"].adapter_limit
    assert "EP-context" in PROVIDERS["qnn"].adapter_limit
    assert PROVIDERS["cuda"].adapter_limit is None


def test_server_start_with_missing_provider_fails_with_the_message(recipe_package):
    import asyncio

    from loraplex.runtime.server import ServerConfig, start_server

    if "cuda" in devices.available_providers():
        pytest.skip("cuda is present on this machine")
    with pytest.raises(DeviceUnavailable, match="available: cpu"):
        asyncio.run(start_server(ServerConfig(package=recipe_package, port=0, device="gpu")))
