"""The server's import path must not pull in training or export stacks (edge devices lack them), nor
ray: only `loraplex serve-ray` (the `loraplex.runtime.cluster` modules, extra `ray`) imports it."""

import subprocess
import sys

HEAVY = ("torch", "peft", "olive", "transformers")


def imported_after(code: str, names) -> str:
    code += f"\nimport sys\nprint(','.join(sorted(n for n in {tuple(names)!r} if n in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_runtime_imports_no_torch_peft_olive_or_ray():
    code = (
        "import pkgutil, importlib, loraplex.runtime as r\n"
        "for m in pkgutil.iter_modules(r.__path__):\n"  # `cluster` here is its package only, ray-free
        "    importlib.import_module('loraplex.runtime.' + m.name)\n"
        "import loraplex.runtime.server.app\n"
        "from loraplex.runtime.cli import build_parser\n"
        "build_parser()\n"  # every subcommand registered, serve-ray included
    )
    found = imported_after(code, (*HEAVY, "ray"))
    assert found == "", f"runtime imported {found}"


def test_cluster_imports_ray_but_no_torch_peft_or_olive():
    code = "import loraplex.runtime.cluster.app\n"
    assert imported_after(code, (*HEAVY, "ray")) == "ray"
