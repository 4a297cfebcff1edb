#!/usr/bin/env bash
# loraplex on ARM64, proven under emulation (qemu-aarch64, user mode) on an x86-64 Debian machine.
#
#   bench/arm64/run.sh [PACKAGE]      # default: the edge bench's real SmolLM2-135M int4 package, 2 adapters
#
# 1. qemu-user-static (Debian's package) for `qemu-aarch64-static`; no binfmt registration needed.
# 2. An arm64 sysroot with Debian bookworm's python3.11 and the libraries it and the wheels link
#    (apt resolves the closure for arm64 into a private apt state; the .debs are unpacked, not installed).
# 3. The runtime-only install: loraplex's runtime dependencies as manylinux aarch64 wheels for
#    CPython 3.11 (pip's --platform, installed into a target directory), and loraplex itself (no deps).
# 4. `python -m bench.arm64.driver`: serves the package under qemu-aarch64 and checks it against x86
#    (gRPC contract, greedy agreement, task accuracy). Timings under emulation mean nothing.
# Everything goes to bench/out/arm64/ (not in git). Not part of `make test` or `make bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${ARM64_OUT:-$ROOT/bench/out/arm64}"
SYSROOT="$OUT/sysroot"
SITE="$OUT/site"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"

# 1. the emulator
if ! command -v qemu-aarch64-static >/dev/null; then
    apt-get install -y -q qemu-user-static >/dev/null
fi

# 2. the arm64 sysroot (python3.11 + shared libraries), from Debian's arm64 packages
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    APT="$OUT/apt"
    mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$SYSROOT"
    : > "$APT/status"
    opts=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists="$APT/lists"
          -o Dir::State::status="$APT/status" -o Dir::Cache::Archives="$APT/archives"
          -o Dir::Cache="$APT" -o Debug::NoLocking=1 -o APT::Install-Recommends=0)
    apt-get "${opts[@]}" -q update >/dev/null
    # python3.11 and what the wheels link beyond manylinux's base: libstdc++, libgcc, libgomp
    apt-get "${opts[@]}" -q -y -d install python3.11 libstdc++6 libgcc-s1 libgomp1 ca-certificates >/dev/null
    for deb in "$APT"/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
fi

# 3. the runtime-only install (aarch64 wheels, CPython 3.11)
if [ ! -f "$SITE/.installed" ]; then
    mkdir -p "$SITE"
    # every manylinux tag bookworm's glibc (2.36) runs: pip's --platform takes no range
    platforms=(--platform manylinux2014_aarch64)
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
    "$PY" -m pip install -q --disable-pip-version-check --target "$SITE" --upgrade "${platforms[@]}" \
        --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none --only-binary=:all: \
        -c "$ROOT/constraints.txt" \
        "onnxruntime>=1.32,<1.33" "onnxruntime-genai==0.18.*" "onnx>=1.17" "llguidance>=1.9,<2" "tokenizers>=0.21" \
        "grpcio>=1.85.1,<1.86" "grpcio-health-checking>=1.85.1,<1.86" "grpcio-reflection>=1.85.1,<1.86" \
        "protobuf>=7.35.1,<8" "numpy>=1.26" "prometheus-client>=0.20" "pyyaml>=6" "tqdm>=4.66" "rich>=13"
    touch "$SITE/.installed"
fi
# loraplex itself, runtime only: the installed layout (loraplex.runtime, .adapters, .v1), no dependencies
rm -rf "$OUT/src" && mkdir -p "$OUT/src/loraplex"
cp -r "$ROOT/runtime" "$OUT/src/loraplex/runtime"
cp -r "$ROOT/adapters" "$OUT/src/loraplex/adapters"
cp -r "$ROOT/proto/loraplex/v1" "$OUT/src/loraplex/v1"
find "$OUT/src" -name __pycache__ -prune -exec rm -rf {} +

# 4. serve it under qemu-aarch64 and compare with x86
export ARM64_SYSROOT="$SYSROOT" ARM64_PYTHONPATH="$OUT/src:$SITE"
"$PY" -m bench.arm64.driver --out "$OUT" "$@"
