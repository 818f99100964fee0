#!/usr/bin/env bash
# Sets up, builds and runs the box's main job on the embedded default
# configuration: canonical preprocessing of the bundled chest radiograph
# (target/demo/chest.npy, the model input, and target/demo/chest.png), then
# the example site's plugin on its bundled EMR record and the same film.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p oxbox
mkdir -p target/demo
./target/release/oxbox dicom info samples/chest-cr-sample.dcm
./target/release/oxbox preprocess --dicom samples/chest-cr-sample.dcm \
  --out target/demo/chest.npy --png target/demo/chest.png
echo "wrote target/demo/chest.npy and target/demo/chest.png" >&2
# The example site's plugin maps its own EMR export to the canonical schema.
bash scripts/build-plugins.sh --no-guests >/dev/null
./target/release/oxbox plugin run plugins/dist/example-site/plugin.toml \
  --emr samples/example-site-record.json --dicom samples/chest-cr-sample.dcm \
  --out target/demo/chest-after-plugins.npy
