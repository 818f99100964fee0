#!/usr/bin/env bash
# Sets up everything the tests need and runs the whole suite: formatting,
# lints, unit tests, the end-to-end tests on real DICOM files (compared with
# the reference implementation in ../shared/reference), the site plugins,
# and the hostile plugins against the sandbox.
#
# Build time is most of a cold run, so every Rust artefact is compiled once:
# one `cargo test --no-run` builds the library, the binary and every test
# binary with one feature set (a separate `cargo build -p oxbox` would
# compile candle, gemm and wasmtime-wasi a second time, because the test
# targets' dev-dependencies change the unified features), and the test
# corpus (Python reference tools, dcmtk, GDCM) is built meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { printf '[test.sh %5ds] %s\n' $((SECONDS - started)) "$*" >&2; }

# Compiled dependencies outlive a clone: a fresh clone's `target` is a link
# to one build directory per user ($OXBOX_TARGET_CACHE, default
# ~/.cache/oxbox/target), so CI on a machine that built oxbox before
# recompiles only oxbox itself (cargo still checks every fingerprint: a
# changed dependency or toolchain is rebuilt). An existing `target` (a
# developer's checkout) is used as it is. OXBOX_TARGET_CACHE=none opts out.
cache=${OXBOX_TARGET_CACHE:-$HOME/.cache/oxbox/target}
if [ ! -e target ] && [ "$cache" != none ]; then
  mkdir -p "$cache"
  ln -s "$cache" target
  step "target -> $cache (shared build directory)"
fi

step "setup"
bash scripts/setup.sh --tests
mkdir -p target
corpus_log=target/corpus-build.log
step "corpus (in the background, log: $corpus_log)"
bash tests/corpus/build.sh >"$corpus_log" 2>&1 &
corpus=$!
step "build: library, binary and test binaries"
if ! cargo test --release --locked --workspace --no-run; then
  kill "$corpus" 2>/dev/null || true
  exit 1
fi
step "site plugins and test guests"
bash scripts/build-plugins.sh --guests
step "waiting for the corpus"
if ! wait "$corpus"; then
  cat "$corpus_log" >&2
  echo "test.sh: building the corpus failed" >&2
  exit 1
fi
tail -n 1 "$corpus_log" >&2

step "format and lints"
for manifest in Cargo.toml plugins/Cargo.toml tests/guests/Cargo.toml; do
  cargo fmt --manifest-path "$manifest" --all -- --check
done
cargo clippy --release --locked --all-targets -- -D warnings
cargo clippy --release --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 -- -D warnings

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
{
  cargo test --release --locked --manifest-path plugins/Cargo.toml --workspace &&
  cargo test --release --locked --workspace
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
step "done"
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "all tests: $(sum passed) passed, $(sum failed) failed"
exit "$status"
