#!/usr/bin/env bash
# Sets up, builds and runs the box's main job on the embedded default
# configuration: canonical preprocessing of the bundled chest radiograph.
# Writes target/demo/chest.npy (the model input) and target/demo/chest.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p oxbox
mkdir -p target/demo
./target/release/oxbox dicom info samples/chest-cr-sample.dcm
./target/release/oxbox preprocess --dicom samples/chest-cr-sample.dcm \
  --out target/demo/chest.npy --png target/demo/chest.png
echo "wrote target/demo/chest.npy and target/demo/chest.png" >&2
