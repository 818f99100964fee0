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
# corpus (Python reference tools, dcmtk, GDCM) is built meanwhile. It uses
# the `ci` profile (the root Cargo.toml): the release profile with what the
# tests do not time at opt-level 1. Its binary, target/ci/oxbox, is the one
# every step below runs ($OXBOX_BIN).
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

step "setup: packages and rustup targets"
bash scripts/setup.sh --tests-system
mkdir -p target
# What only the tests use (the Python venvs and cargo-fuzz: 55 s of a cold
# run's setup, one after the other, measured alone) is installed beside
# the main build, as the test corpus is built.
tools_log=target/setup-tools.log
step "setup: the tests' tools (in the background, log: $tools_log)"
bash scripts/setup.sh --tests-tools >"$tools_log" 2>&1 &
tools=$!
corpus_log=target/corpus-build.log
step "corpus (in the background, log: $corpus_log)"
bash tests/corpus/build.sh >"$corpus_log" 2>&1 &
corpus=$!
# The lints run inside that build: clippy-driver (the compiler with clippy's
# lints) compiles the workspace's own crates, so the dependencies are compiled
# once, for the tests, instead of a second time in check mode for a separate
# `cargo clippy` (3.5 minutes of a cold run). `cargo test --no-run` builds
# every target `cargo clippy --all-targets` checks (library, binary, examples,
# test binaries, the library's unit tests); CLIPPY_ARGS is how cargo-clippy
# hands `-D warnings` to the driver (the toolchain is pinned in
# rust-toolchain.toml). Every host cargo command below keeps this
# environment, or it would rebuild the oxbox crate without it.
RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
export RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS
# OXBOX_BUILD_TIMINGS=1 writes cargo's per-crate timing report
# (target/cargo-timings/) for the build.
timings=${OXBOX_BUILD_TIMINGS:+--timings}
step "build: library, binary and test binaries, with the host's lints"
if ! cargo test --profile ci --locked --workspace --no-run $timings; then
  kill "$corpus" "$tools" 2>/dev/null || true
  exit 1
fi
OXBOX_BIN=$PWD/target/ci/oxbox
export OXBOX_BIN
step "site plugins and test guests"
# The Wasm guests are other workspaces, linted by their own clippy below.
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS bash scripts/build-plugins.sh --guests
step "waiting for the tests' tools and the corpus"
if ! wait "$tools"; then
  cat "$tools_log" >&2
  echo "test.sh: installing the tests' tools failed" >&2
  kill "$corpus" 2>/dev/null || true
  exit 1
fi
if ! wait "$corpus"; then
  cat "$corpus_log" >&2
  echo "test.sh: building the corpus failed" >&2
  exit 1
fi
tail -n 1 "$corpus_log" >&2

step "format and lints"
for manifest in Cargo.toml plugins/Cargo.toml tests/guests/Cargo.toml host/fuzz/Cargo.toml; do
  cargo fmt --manifest-path "$manifest" --all -- --check
done
cargo clippy --release --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 -- -D warnings

# Two deployment checks' builds use their own build directories (cargo
# holds `target`'s lock while the tests run), so they run beside the tests,
# at the lowest priority: they take the CPU time the tests leave idle
# (waiting on servers, timeouts and child processes) and little else.
step "background: the fuzz targets' instrumented build, the CUDA check (logs in target/)"
nice -n 19 bash scripts/fuzz.sh --build >target/fuzz-build.log 2>&1 &
fuzz_build=$!
nice -n 19 bash scripts/cuda-check.sh >target/cuda-check.log 2>&1 &
cuda_check=$!

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
{
  env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS \
    cargo test --release --locked --manifest-path plugins/Cargo.toml --workspace &&
  cargo test --profile ci --locked --workspace
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The aarch64 check's cross build needs `target`'s lock, free from here: it
# runs beside the fuzz smoke and the soak (which leaves most of the CPU
# idle), at the lowest priority; its comparisons under qemu come last.
step "background: the aarch64 check's cross build (log in target/)"
nice -n 19 bash scripts/aarch64-check.sh --build >target/aarch64-build.log 2>&1 &
aarch64_build=$!
# Fuzz smoke run (each target 10 s; the instrumented build lives in
# target/fuzz, so a warm CI run rebuilds only the focused crates the targets
# use) and a 1-minute soak.
step "fuzz smoke (scripts/fuzz.sh 10; waiting for its build first)"
if wait "$fuzz_build"; then
  tail -n 1 target/fuzz-build.log >&2
  bash scripts/fuzz.sh --no-build 10 || { echo "test.sh: fuzz smoke FAILED" >&2; status=1; }
else
  cat target/fuzz-build.log >&2
  echo "test.sh: the fuzz build FAILED" >&2
  status=1
fi
step "soak, 1 minute (scripts/soak.sh 1)"
bash scripts/soak.sh 1 || { echo "test.sh: soak FAILED" >&2; status=1; }
# The edge box's deployment checks (firmware-notes/README.md): the systemd
# units, the aarch64 binary under qemu against the x86 one, and the CUDA
# build (compiled, not linked; it ran beside the tests, its log is shown
# here). Each is a script a person can run alone; their builds live under
# `target`, so they are warm after a machine's first run.
step "systemd-check"
bash scripts/systemd-check.sh || { echo "test.sh: systemd-check FAILED" >&2; status=1; }
step "aarch64-check (waiting for its cross build first)"
if wait "$aarch64_build"; then
  tail -n 1 target/aarch64-build.log >&2
  bash scripts/aarch64-check.sh --no-build || { echo "test.sh: aarch64-check FAILED" >&2; status=1; }
else
  cat target/aarch64-build.log >&2
  echo "test.sh: the aarch64 cross build FAILED" >&2
  status=1
fi
step "cuda-check (ran beside the tests; its log)"
cuda_status=0
wait "$cuda_check" || cuda_status=$?
cat target/cuda-check.log >&2
[ "$cuda_status" = 0 ] || { echo "test.sh: cuda-check FAILED" >&2; status=1; }
step "done"
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "all tests: $(sum passed) passed, $(sum failed) failed"
exit "$status"
