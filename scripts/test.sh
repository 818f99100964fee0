#!/usr/bin/env bash
# Sets up everything the tests need and runs the whole suite: formatting,
# lints, unit tests and the end-to-end tests on real DICOM files (which
# compare oxbox with the reference implementation in ../shared/reference).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
bash tests/corpus/build.sh
cargo fmt --all -- --check
cargo clippy --release --locked --all-targets -- -D warnings
log=$(mktemp)
set +e
cargo test --release --locked --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "all tests: $(sum passed) passed, $(sum failed) failed"
rm -f "$log"
exit "$status"
