"""What the numbers were measured on: the machine and the version of every relevant package."""

from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = (
    "loraplex",
    "onnxruntime",
    "onnxruntime-genai",
    "onnx",
    "olive-ai",
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "numpy",
    "grpcio",
    "protobuf",
    "psutil",
    "matplotlib",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import psutil

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


BUSY_SHARE = 0.15  # others using more of the CPU than this: a spinning comparison would measure them


def busy_share(seconds: float = 2.0) -> float:
    """The share of all cores busy over `seconds` (/proc/stat), measured while the bench itself idles:
    what other processes take. Spinning threads need their cores to themselves, so a comparison of
    spinning systems measured beside such load says more about the neighbours than about the systems."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total else 0.0
