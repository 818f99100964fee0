#!/usr/bin/env bash
# Sets up, builds and starts the box on a fresh clone: the release binary and
# the site plugins, then `oxbox serve --config config/demo.toml` on
# http://127.0.0.1:8480 with the example site's plugin and the trained demo
# model embedded in the binary (host/assets/demo-model, "trained": true;
# trained on synthetic data by scripts/train-demo.sh). Before serving it shows the ingest on the bundled
# radiograph (target/demo/chest.npy, target/demo/chest.png).
#   scripts/run.sh            # … and serve (Ctrl-C stops)
#   scripts/run.sh --no-serve # everything but the server
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p oxbox
oxbox=./target/release/oxbox
mkdir -p target/demo
"$oxbox" dicom info samples/chest-cr-sample.dcm
"$oxbox" preprocess --dicom samples/chest-cr-sample.dcm \
  --out target/demo/chest.npy --png target/demo/chest.png
echo "wrote target/demo/chest.npy and target/demo/chest.png" >&2
# The example site's plugin maps its own EMR export to the canonical schema.
bash scripts/build-plugins.sh --no-guests >/dev/null
"$oxbox" plugin run plugins/dist/example-site/plugin.toml \
  --emr samples/example-site-record.json --dicom samples/chest-cr-sample.dcm \
  --out target/demo/chest-after-plugins.npy
"$oxbox" model info host/assets/demo-model | head -5
[ "${1:-}" = "--no-serve" ] && exit 0
cat >&2 <<'MSG'
serving; in another terminal:
  curl -s -F 'dicom=@samples/chest-cr-sample.dcm;type=application/dicom' \
       -F 'emr=@samples/example-site-record.json;type=application/json' \
       http://127.0.0.1:8480/v1/predict
MSG
exec "$oxbox" --config config/demo.toml serve
