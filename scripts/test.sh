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
cargo test --release --locked --workspace
