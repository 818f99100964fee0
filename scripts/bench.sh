#!/usr/bin/env bash
# Decode + preprocess speed, oxbox beside the reference (pydicom + numpy),
# same machine, same session, on RG1 (1955×1841, 15-bit chest CR) uncompressed
# and JPEG 2000 lossless. Prints a Markdown table for the README.
#   scripts/bench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
shared=${OXBOX_SHARED:-$(pwd)/../shared}
eval "$(bash "$shared/reference/setup.sh" | sed 's/^/ref_/')"
cargo build --release --locked -p oxbox >&2
echo "| file | oxbox decode | oxbox preprocess | oxbox total | reference decode | reference preprocess | reference total | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for f in RG1_UNCR RG1_J2KR; do
  ours=$(./target/release/oxbox bench --dicom "$ref_wg04/$f.dcm" --runs "$runs")
  # The reference's numpy is timed as shipped (OpenBLAS is not involved).
  theirs=$("$ref_python" "$shared/reference/cxr_reference.py" bench "$ref_wg04/$f.dcm" --runs "$runs")
  "$ref_python" - "$f" "$ours" "$theirs" <<'PY'
import json, sys
name, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
od, op, ot = (ours[k]["median_ms"] for k in ("decode", "preprocess", "decode_plus_preprocess"))
rd, rp = theirs["decode"]["median_ms"], theirs["preprocess"]["median_ms"]
print(f"| {name}.dcm | {od:.1f} ms | {op:.1f} ms | {ot:.1f} ms | {rd:.1f} ms | {rp:.1f} ms | {rd + rp:.1f} ms | {ot / (rd + rp):.2f}× |")
PY
done
