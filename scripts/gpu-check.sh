#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and its driver), checks oxbox's CUDA
# backend end to end:
#   1. builds with `--features cuda` (the toolkit's nvcc; CUDA_COMPUTE_CAP
#      from nvidia-smi unless set);
#   2. runs the GPU tests: inference on cuda:0 equals the CPU's within 1e-4
#      (the demo model and ResNet-18 at 224², batch 1/8/32), and training's
#      logits and every gradient equal the CPU's within 1e-4 of their scale
#      (host/model/src/lib.rs, `cuda_*`), then the rest of the model tests;
#   3. prints the forward latency at batch 1, 8 and 32 on the GPU (ResNet-18
#      at 224², RG1) and the training throughput (cases/s, batch 16).
# Without an NVIDIA GPU it builds nothing, says SKIPPED and exits 77 (the
# conventional "skipped" status): it never passes without having run.
# The build uses its own target directory (target/gpu) so that it does not
# invalidate the CPU build.
#   scripts/gpu-check.sh [RG1.dcm]
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { printf '[gpu-check %4ds] %s\n' $((SECONDS - started)) "$*" >&2; }
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: SKIPPED: no NVIDIA GPU here (nvidia-smi finds none); nothing was checked" >&2
  exit 77
fi
nvidia-smi -L >&2
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
fi
export CUDA_COMPUTE_CAP
command -v nvcc >/dev/null || {
  echo "gpu-check: no nvcc on PATH: install the CUDA toolkit (or see scripts/cuda-check.sh)" >&2
  exit 1
}
nvcc --version | tail -n 1 >&2
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu}
features=${OXBOX_GPU_FEATURES:-cuda}

step "build (--features $features, sm_$CUDA_COMPUTE_CAP)"
cargo build --release --locked -p oxbox --features "$features"
oxbox=$CARGO_TARGET_DIR/release/oxbox

step "GPU tests: CUDA equals the CPU (inference and training)"
cargo test --release --locked -p oxbox-model --features "$features" --lib tests::cuda_ -- --test-threads 1
step "the model and training tests on the cuda build"
cargo test --release --locked -p oxbox-model --features "$features" --lib
cargo test --release --locked -p oxbox --features "$features" --lib train::

step "figures"
dicom=${1:-${OXBOX_CORPUS:-tests/.corpus}/encoded/rg1_explicit_le.dcm}
[ -f "$dicom" ] || dicom=samples/chest-cr-sample.dcm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$oxbox" model init --out "$work/resnet18" --backbone resnet18 >/dev/null
echo "forward pass, ResNet-18 at 224², ms per case at batch 1/8/32 (cuda:0):"
"$oxbox" bench --dicom "$dicom" --model "$work/resnet18" --device cuda:0 --batch 1,8,32 --runs 20
echo "training throughput, ResNet-18 at 224², batch 16 (cuda:0):"
"$oxbox" bench --train resnet18 --size 224 --batch 16 --steps 20 --device cuda:0
echo "the same on the CPU, for comparison:"
"$oxbox" bench --train resnet18 --size 224 --batch 16 --steps 3 --device cpu
step "done"
