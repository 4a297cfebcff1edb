"""The server's import path must not pull in training or export stacks (edge devices lack them)."""

import subprocess
import sys

HEAVY = ("torch", "peft", "olive", "transformers")


def test_runtime_imports_no_torch_peft_or_olive():
    code = (
        "import sys, pkgutil, importlib, loraplex.runtime as r\n"
        "for m in pkgutil.iter_modules(r.__path__):\n"
        "    importlib.import_module('loraplex.runtime.' + m.name)\n"
        f"print(','.join(sorted(n for n in {HEAVY!r} if n in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime imported {out.stdout.strip()}"
