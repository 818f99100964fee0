#!/usr/bin/env bash
# Sets up everything the tests need and runs the whole suite: formatting,
# lints, unit tests, the end-to-end tests on real DICOM files (compared with
# the reference implementation in ../shared/reference), the site plugins,
# and the hostile plugins against the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
bash tests/corpus/build.sh
cargo build --release --locked -p oxbox
bash scripts/build-plugins.sh --guests

for manifest in Cargo.toml plugins/Cargo.toml tests/guests/Cargo.toml; do
  cargo fmt --manifest-path "$manifest" --all -- --check
done
cargo clippy --release --locked --all-targets -- -D warnings
cargo clippy --release --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
{
  cargo test --release --locked --manifest-path plugins/Cargo.toml -p oxbox-emr-schema --lib &&
  cargo test --release --locked --workspace
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "all tests: $(sum passed) passed, $(sum failed) failed"
exit "$status"
