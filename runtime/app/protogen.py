"""Regenerate the Python code of the gRPC contract: `python -m loraplex.runtime.app.protogen` (`make proto`).

The generated `*_pb2.py` and `*_pb2_grpc.py` are committed beside the .proto files in
`proto/loraplex/v1/` (package `loraplex.v1`) so that a server needs no protoc;
tests/runtime/test_protogen.py fails when they are stale. grpc_tools is a dev dependency and is
imported only here, only when run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO_PACKAGE = Path("loraplex") / "v1"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the contract, relative to `root`."""
    return sorted(p.relative_to(root) for p in (root / PROTO_PACKAGE).glob("*.proto"))


def generate(out_root: Path = PROTO_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every contract file, writing under `out_root/loraplex/v1`; returns the files written."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise RuntimeError("grpcio-tools is not installed: pip install -e '.[dev]'") from exc

    out_root = Path(out_root)
    (out_root / PROTO_PACKAGE).mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p) for p in proto_files(proto_root)]
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}) on {', '.join(files)}")
    generated = ("_pb2.py", "_grpc.py")
    return sorted(p for p in (out_root / PROTO_PACKAGE).iterdir() if p.name.endswith(generated))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
