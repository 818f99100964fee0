#!/usr/bin/env bash
# Checks that oxbox compiles with the `cuda` feature (candle's CUDA backend),
# for the Jetson Orin (compute capability 8.7), on a machine without a GPU
# or CUDA install: `cargo check --features cuda -p oxbox`, lints included.
# candle-kernels' build script runs nvcc on every kernel, so the check needs
# a real CUDA compiler; it comes from NVIDIA's PyPI wheels in a venv under
# target/ (cached with the build directory). Nothing is linked: linking
# needs libcuda, the driver, which is not on PyPI (scripts/gpu-check.sh
# builds and runs on a GPU machine).
#
# The versions must match each other: the nvcc driver, its crt headers, nvvm,
# the runtime headers and CCCL all from CUDA 13.3 (cudarc 0.19, which candle
# 0.11 uses, refuses 13.5; the -cu12 nvcc wheel ships no nvcc driver; headers
# from another release fail with "CUDA compiler and CUDA toolkit headers are
# incompatible").
#
# From an empty build directory the check took 14 min on 2 cores (25 min of
# CPU, most of it nvcc on the kernels; measured 30 Nov). The kernels are compiled
# into candle-kernels' OUT_DIR in target/, and a later run with the same
# venv path and compute capability reuses them (the venv is addressed through
# its resolved path, so a fresh clone whose `target` links to the shared
# build directory sees the same path).
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
# The same environment as scripts/test.sh: clippy's lints run inside the
# check, on the code behind `cfg(feature = "cuda")` too.
RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
export RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
cargo check --release --locked -p oxbox --features cuda --all-targets
echo "cuda-check: oxbox checks with --features cuda (sm_$CUDA_COMPUTE_CAP) in $((SECONDS - started)) s" >&2
