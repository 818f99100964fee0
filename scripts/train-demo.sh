#!/usr/bin/env bash
# Reproduces the trained demo model that oxbox embeds (host/assets/demo-model)
# and measures it: a 4-site synthetic training cohort, `oxbox train` (tiny
# backbone, 224 px, seed 2020, 2 threads), then `oxbox evaluate` on a held-out
# 4-site cohort drawn with another seed from the same sites. Prints how long
# each step took. Needs about 17 GB of disk for the two cohorts.
#   scripts/train-demo.sh [WORK_DIR]        # default target/demo-cohort
#   INSTALL=1 scripts/train-demo.sh         # also copy the model into host/assets/demo-model
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/demo-cohort}
cargo build --release --locked -p oxbox
bash scripts/build-plugins.sh --no-guests >/dev/null
oxbox=./target/release/oxbox
sites() { local d=$1; echo "$d/site-1,$d/site-2,$d/site-3,$d/site-4"; }
timed() { local start=$SECONDS; "$@"; echo "took $((SECONDS - start)) s: ${*:1:2}" >&2; }
[ -f "$work/train/truth.json" ] ||
  timed "$oxbox" synth --sites 4 --cases-per-site 400 --seed 2020 --out "$work/train"
[ -f "$work/test/truth.json" ] ||
  timed "$oxbox" synth --sites 4 --cases-per-site 200 --seed 2021 --out "$work/test"
rm -rf "$work/model" "$work/report"
timed "$oxbox" train --data "$(sites "$work/train")" --out "$work/model" \
  --backbone tiny --input-size 224 --epochs 30 --seed 2020 --threads 2 --name exam-demo
timed "$oxbox" evaluate --model "$work/model" --data "$(sites "$work/test")" --out "$work/report"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
truth = json.load(open(f"{work}/test/truth.json"))
report = json.load(open(f"{work}/report/report.json"))
pooled = next(g for g in report["groups"] if g["group"] == "pooled")
ours = pooled["outputs"][0]["auc"]["auc"]
bayes = truth["pooled_bayes_auc"]["24h"]["p_o2_any"]
print(f"pooled AUC P(level>=1, 24 h): model {ours:.4f}, Bayes-optimal {bayes:.4f}, gap {bayes - ours:.4f}")
PY
if [ "${INSTALL:-0}" = 1 ]; then
  cp "$work/model/model.toml" "$work/model/weights.safetensors" host/assets/demo-model/
  echo "installed into host/assets/demo-model (rebuild to embed it)" >&2
fi
