#!/usr/bin/env bash
# Checks that oxbox compiles with the `cuda` feature (candle's CUDA backend),
# for the Jetson Orin (compute capability 8.7), on a machine without a GPU
# or CUDA install. Every `cfg(feature = "cuda")` of oxbox is in the crate
# `oxbox-model` (host/model: device selection, the GPU tests), and the rest
# of oxbox only forwards the feature to it, so the check is
# `cargo check --features cuda` of that crate, its unit tests included,
# with warnings denied.
#
# candle-kernels' build script runs nvcc, so the check needs a real CUDA
# compiler; it comes from NVIDIA's PyPI wheels in a venv under target/
# (cached with the build directory). Nothing is linked: linking needs
# libcuda, the driver, which is not on PyPI (scripts/gpu-check.sh builds and
# runs on a GPU machine).
#
# The versions must match each other: the nvcc driver, its crt headers, nvvm,
# the runtime headers and CCCL all from CUDA 13.3 (cudarc 0.19, which candle
# 0.11 uses, refuses 13.5; the -cu12 nvcc wheel ships no nvcc driver; headers
# from another release fail with "CUDA compiler and CUDA toolkit headers are
# incompatible").
#
# The check runs in its own workspace (host/cuda-check) with candle-kernels
# patched to its published source less one thing: the static library of
# quantized mixture-of-experts kernels (libmoe.a: 15 .cu files compiled to
# machine code, which only a link uses and oxbox never calls). That library
# was 85 % of nvcc's work here (one of its ten mmq instances takes 50 s of
# nvcc, the largest PTX file, quantized.cu, 30 s; 30 Nov); every PTX kernel
# candle loads at run time is still compiled. gpu-check.sh builds the
# unpatched crate. The workspace's Cargo.lock is the root one, copied in; the
# script fails if resolving it moved any version.
#   scripts/cuda-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
mkdir -p target
venv="$(readlink -f target)/cuda-venv"
wheels=(
  'nvidia-cuda-nvcc==13.3.73'
  'nvidia-cuda-crt==13.3.73'
  'nvidia-nvvm==13.3.73'
  'nvidia-cuda-runtime==13.3.29'
  'nvidia-cuda-cccl==13.3.5.0.6'
)
stamp="$venv/.oxbox-wheels"
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
  echo "cuda-check: creating $venv (${wheels[*]})" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "${wheels[@]}"
  echo "${wheels[*]}" >"$stamp"
fi
cuda=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cuda/bin/nvcc" ] || { echo "cuda-check: no nvcc in $cuda" >&2; exit 1; }
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-87}
# cudaforge (candle-kernels' build script) runs nvcc on half the cores by
# default — one on this machine; the kernels are the check's long pole, so
# all of them. (Device optimisation flags do not shorten it: nearly all of
# nvcc's time is cicc's C++ front end and ptxas on the templated kernels,
# and -G / -Xptxas -O0 / -Xcicc -O0 measured no faster.)
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
nvcc --version | tail -n 2 >&2

# candle-kernels' source as the root Cargo.lock pins it, less libmoe.a.
version=$(python3 - <<'PY'
import tomllib
lock = tomllib.load(open("Cargo.lock", "rb"))
print(next(p["version"] for p in lock["package"] if p["name"] == "candle-kernels"))
PY
)
cargo fetch --locked >/dev/null
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"candle-kernels-$version" | head -n 1)
[ -f "$src/build.rs" ] || { echo "cuda-check: no source for candle-kernels $version" >&2; exit 1; }
kernels=target/cuda-check/candle-kernels
mkdir -p "$kernels"
# mtimes kept and build.rs only rewritten when it changes, so that a warm
# run does not rerun nvcc.
tar -C "$src" --exclude=./build.rs -cf - . | tar -C "$kernels" -xpf -
python3 - "$src/build.rs" "$kernels/build.rs" <<'PY'
import sys
text = open(sys.argv[1]).read()
# Keep everything up to the PTX bindings being written; drop the static
# library that follows (from `let mut moe_sources` to the link directives).
start = text.index("    let mut moe_sources")
end = text.index("    Ok(())", start)
patched = text[:start] + "    // oxbox's cuda-check: no static MoE library (see scripts/cuda-check.sh).\n" + text[end:]
# Third-party code: its lints are not oxbox's (RUSTFLAGS denies warnings).
patched = "#![allow(warnings)]\n" + patched
import os
if not os.path.exists(sys.argv[2]) or patched != open(sys.argv[2]).read():
    open(sys.argv[2], "w").write(patched)
PY

cp Cargo.lock host/cuda-check/Cargo.lock
# Warnings are errors in oxbox-model (a path dependency here: the registry's
# crates have their lints capped). Its own target directory: these flags and
# features would otherwise rebuild the main build's dependencies.
RUSTFLAGS="-D warnings" CARGO_TARGET_DIR=target/cuda-check/target \
  cargo check --release --offline --manifest-path host/cuda-check/Cargo.toml \
  -p oxbox-model --all-targets
python3 - Cargo.lock host/cuda-check/Cargo.lock <<'PY'
import sys, tomllib
root, check = ({(p["name"], p["version"]) for p in tomllib.load(open(f, "rb"))["package"]} for f in sys.argv[1:])
moved = sorted(check - root - {("oxbox-cuda-check", "0.0.0")})
if moved:
    sys.exit(f"cuda-check: resolving moved these versions from the root Cargo.lock: {moved}")
PY
echo "cuda-check: oxbox-model checks with --features cuda (sm_$CUDA_COMPUTE_CAP) in $((SECONDS - started)) s" >&2
