"""The server's import path must not pull in training or export stacks (edge devices lack them),
and a gRPC-only server must not pull in the optional HTTP stack (`loraplex[http]`)."""

import subprocess
import sys

HEAVY = ("torch", "peft", "olive", "transformers")
HTTP_STACK = ("starlette", "uvicorn", "fastapi", "openai")
HTTP_PACKAGE = "loraplex.runtime.http"

IMPORTED_BY = """
import sys, pkgutil, importlib, loraplex.runtime as r
skip = {skip!r}
for m in pkgutil.walk_packages(r.__path__, 'loraplex.runtime.'):
    if not (skip and m.name.startswith(skip + '.')):
        importlib.import_module(m.name)
print(','.join(sorted(n for n in {names!r} if n in sys.modules)))
"""


def imported(names: tuple[str, ...], skip: str = "") -> str:
    code = IMPORTED_BY.format(skip=skip, names=names)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_runtime_imports_no_torch_peft_or_olive():
    assert imported(HEAVY) == "", "the runtime (HTTP front end included) imported a training or export stack"


def test_runtime_outside_the_http_front_end_imports_no_http_stack():
    assert imported(HTTP_STACK, skip=HTTP_PACKAGE) == "", "a gRPC-only server would import the HTTP extra"
