"""The server's import path must not pull in training or export stacks (edge devices lack them), nor
ray (only `loraplex serve-ray`, the `loraplex.runtime.cluster` modules, extra `ray`, imports it), and a
gRPC-only server must not pull in the optional HTTP stack (`loraplex[http]`)."""

import subprocess
import sys

HEAVY = ("torch", "peft", "olive", "transformers")
HTTP_STACK = ("starlette", "uvicorn", "fastapi", "openai")
CLUSTER_PACKAGE = "loraplex.runtime.cluster"
HTTP_PACKAGE = "loraplex.runtime.http"

IMPORTED_BY = """
import sys, pkgutil, importlib, loraplex.runtime as r
skip = {skip!r}
for m in pkgutil.walk_packages(r.__path__, 'loraplex.runtime.'):
    if not any(m.name.startswith(s + '.') for s in skip):
        importlib.import_module(m.name)
import loraplex.runtime.server.app
from loraplex.runtime.app.cli import build_parser
build_parser()  # every subcommand registered, serve-ray included
print(','.join(sorted(n for n in {names!r} if n in sys.modules)))
"""


def imported(names: tuple[str, ...], skip: tuple[str, ...] = ()) -> str:
    """Which of `names` importing every runtime module (but those under `skip`) pulls in."""
    code = IMPORTED_BY.format(skip=skip, names=names)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def imported_after(code: str, names: tuple[str, ...]) -> str:
    code += f"\nimport sys\nprint(','.join(sorted(n for n in {names!r} if n in sys.modules)))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_runtime_imports_no_torch_peft_olive_or_ray():
    found = imported((*HEAVY, "ray"), skip=(CLUSTER_PACKAGE,))
    assert found == "", f"the runtime (HTTP front end included) imported {found}"


def test_runtime_outside_the_http_front_end_imports_no_http_stack():
    found = imported(HTTP_STACK, skip=(HTTP_PACKAGE, CLUSTER_PACKAGE))
    assert found == "", f"a gRPC-only server would import the HTTP extra: {found}"


def test_cluster_imports_ray_but_no_torch_peft_or_olive():
    assert imported_after("import loraplex.runtime.cluster.app\n", (*HEAVY, "ray")) == "ray"


def test_a_server_start_registers_only_the_runtime_commands_and_parses_them_alike():
    """`loraplex serve` skips the trainer's and exporter's argument modules (start-up time); its
    options parse to the same namespace as with every stage registered."""
    argv = ["serve", "--package", "pkg", "--profile", "edge", "--threads", "1", "--http-port", "0"]
    fast = f"from loraplex.runtime.app.cli import build_parser\nbuild_parser(serving_only=True).parse_args({argv!r})\n"
    assert imported_after(fast, ("loraplex.trainer", "loraplex.adapters.export")) == ""
    from loraplex.runtime.app.cli import build_parser

    assert vars(build_parser(serving_only=True).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_a_plain_server_imports_no_llguidance_until_a_constraint():
    """llguidance (and the importlib.metadata it pulls in) loads at the first output constraint, not with
    the server or the batched engine's modules; checking a constraint loads it."""
    start = ("import loraplex.runtime.server.app, loraplex.runtime.engines.batched.executor\n"
             "import loraplex.runtime.app.cli\n")
    assert imported_after(start, ("llguidance",)) == ""
    check = (start + "from loraplex.adapters.package.output import OutputConstraint\n"
             "from loraplex.runtime.engines.guidance import check_constraint\n"
             "check_constraint(OutputConstraint('regex', 'a+'), 'output')\n")
    assert imported_after(check, ("llguidance",)) == "llguidance"
