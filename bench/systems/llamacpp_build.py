"""llama.cpp, the edge peer, built from source for the bench (never by `make test`).

What `make bench` does here, once, cached under `bench/out/llamacpp-<version>/`:
1. `pip download` the llama-cpp-python sdist from PyPI (its `vendor/llama.cpp` is the llama.cpp
   tree those Python bindings were written against);
2. cmake (+ ninja when present) builds `llama-server` and the shared libraries (`libllama`,
   `libggml*`) from that tree, `-DGGML_NATIVE=ON` (this CPU's instruction set, as a device build
   would), no curl, no OpenSSL;
3. the Python bindings are installed without building the library again
   (`CMAKE_ARGS=-DLLAMA_BUILD=OFF`): they load the libraries of step 2 through
   `LLAMA_CPP_LIB_PATH`, so llama-server and llama-cpp-python run the same compiled code.
It also converts the imported Hugging Face base to an f32 GGUF with that tree's own
`convert_hf_to_gguf.py` (offline), for token-exact comparisons with loraplex fp32.

Threads: llama.cpp's CPU backend uses OpenMP; its worker threads busy-wait between parallel
regions by default (its users run it so, and on a dedicated device it is llama.cpp's fastest), and
on a machine shared with other work they then collapse. The bench's headline runs llama.cpp at that
default and its second table with `OMP_WAIT_POLICY=PASSIVE` (`LlamaCpp.env`), onnxruntime with
`--spin` and without it to match.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bench.paths import REPO_ROOT

log = logging.getLogger("bench.llamacpp")

VERSION = "0.3.36"  # llama-cpp-python: the sdist whose vendored llama.cpp is built (pinned here)


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp cannot be built or run here; the message says why."""


@dataclass(frozen=True)
class LlamaCpp:
    root: Path
    source: Path  # the llama.cpp tree (vendor/llama.cpp of the sdist)
    bin_dir: Path  # llama-server and the shared libraries

    @property
    def server(self) -> Path:
        return self.bin_dir / "llama-server"

    def env(self, spin: bool = False) -> dict[str, str]:
        """Environment for a llama.cpp process (llama-server, or Python importing llama_cpp)."""
        env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(self.bin_dir)}
        env.pop("OMP_WAIT_POLICY", None)  # llama.cpp's own default: threads spin
        if not spin:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env


def _run(cmd: list[str], log_file: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    log.info("running %s (log: %s)", " ".join(str(c) for c in cmd[:6]), log_file)
    with open(log_file, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        raise LlamaCppUnavailable(f"{' '.join(str(c) for c in cmd[:4])} failed (exit {proc.returncode}):\n"
                                  + "\n".join(tail))


def _sdist(root: Path) -> Path:
    dl = root / "dl"
    found = sorted(dl.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    dl.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-binary", ":all:",
          "--no-deps", f"llama-cpp-python=={VERSION}", "-d", str(dl)], root / "download.log")
    found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise LlamaCppUnavailable(f"pip download left no sdist in {dl}")
    return found[0]


def _extract(sdist: Path, root: Path) -> Path:
    tree = root / "src" / f"llama_cpp_python-{VERSION}"
    if (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return tree
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "src", filter="data")
    return tree


def _build(source: Path, build: Path, root: Path, jobs: int) -> Path:
    bin_dir = build / "bin"
    if (bin_dir / "llama-server").is_file() and (bin_dir / "libllama.so").exists():
        return bin_dir
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaCppUnavailable(f"building llama.cpp needs {tool} on PATH (apt-get install cmake g++)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log.info("building llama.cpp from %s (about 8 minutes on 2 quiet cores; much longer on a busy machine)", source)
    _run(["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF"], root / "build.log")
    _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server", "llama"],
         root / "build.log")
    return bin_dir


def _bindings_installed() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python") == VERSION
    except metadata.PackageNotFoundError:
        return False


def _install_bindings(sdist: Path, root: Path) -> None:
    if _bindings_installed():
        return
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    constraints = REPO_ROOT / "constraints.txt"
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", str(constraints)]
    _run([*pip, "diskcache"], root / "install.log", env=env)  # llama_cpp imports it
    _run([*pip, "--no-deps", str(sdist)], root / "install.log", env=env)


PREBUILT_ENV = "LORAPLEX_BENCH_LLAMACPP"  # a llama.cpp tree whose build/bin holds llama-server and its libraries


def prebuilt(tree: Path) -> LlamaCpp:
    """An existing llama.cpp build (`tree/build/bin`): nothing downloaded, built or installed. The
    llama-cpp-python peers then run only if `llama_cpp` is already importable here."""
    bin_dir = tree / "build" / "bin"
    if not (bin_dir / "llama-server").is_file():
        raise LlamaCppUnavailable(f"{bin_dir / 'llama-server'} not found (set by {PREBUILT_ENV})")
    return LlamaCpp(tree, tree, bin_dir)


def ensure(out_root: Path, jobs: int | None = None) -> LlamaCpp:
    """Download, build and install (each step only once); raises LlamaCppUnavailable with the reason.
    With LORAPLEX_BENCH_LLAMACPP set, that existing build instead (`prebuilt`)."""
    if os.environ.get(PREBUILT_ENV):
        return prebuilt(Path(os.environ[PREBUILT_ENV]))
    root = out_root / f"llamacpp-{VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    sdist = _sdist(root)
    tree = _extract(sdist, root)
    bin_dir = _build(tree / "vendor" / "llama.cpp", root / "build", root, jobs or os.cpu_count() or 2)
    _install_bindings(sdist, root)
    return LlamaCpp(root, tree / "vendor" / "llama.cpp", bin_dir)


def f32_gguf(llama: LlamaCpp, hf_dir: Path, out: Path) -> Path:
    """The Hugging Face base as an f32 GGUF, by llama.cpp's own converter (offline)."""
    if out.is_file():
        return out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tmp = out.with_suffix(".tmp.gguf")
    _run([sys.executable, str(llama.source / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
          "--outfile", str(tmp)], out.parent / "convert_f32.log", env=env, cwd=llama.source)
    os.replace(tmp, out)
    return out
