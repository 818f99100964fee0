#!/usr/bin/env bash
# Builds the fuzz targets (host/fuzz/, cargo-fuzz + libFuzzer) and runs each
# for SECONDS (default 30), side by side (as many at once as there are
# cores), seeded by scripts/fuzz-seeds.py from the test corpus. Fails on
# any crash, timeout or out-of-memory (the input is left in
# target/fuzz/artifacts/<target>/); prints the executions per target.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     build, then run (all targets)
#   scripts/fuzz.sh --build                   build only
#   scripts/fuzz.sh --no-build SECONDS [...]  run what was built
#
# Toolchain: the pinned stable one. cargo-fuzz's default AddressSanitizer
# needs nightly's -Zsanitizer, so the targets are built with `-s none`:
# libFuzzer's coverage instrumentation (sanitizer-coverage through stable
# -C passes/-C llvm-args) without ASan — Rust's own checks find the
# bugs ASan would in safe code, and a C codec's overflow shows as a crash
# only when it faults. RUSTC_BOOTSTRAP is not needed.
#
# Build cost: the targets use only the focused crates under host/ (DICOM,
# HTTP bodies, plugin manifests, federation formats, signing), so the
# instrumented build in target/fuzz compiles dicom-rs, the codecs, hyper and
# ring, never candle, wasmtime or SQLite: 183 s from nothing on the 2-core
# CI machine, 141 s with the main build's libjpeg-turbo (below; 1 Dec,
# nothing beside it), against 15 min when the targets used the whole oxbox
# crate.
# target/fuzz sits under the shared target directory in CI, so it persists
# between runs. Crash reproduction:
#   target/fuzz/x86_64-unknown-linux-gnu/release/<target> <artifact>
set -euo pipefail
cd "$(dirname "$0")/.."
targets_all=(dicom_ingest predict_request plugin_manifest federation_documents federation_shards)
build=1 run=1
case "${1:-}" in
  --build) run=0; shift ;;
  --no-build) build=0; shift ;;
esac
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${targets_all[@]}")
dir=$PWD/target/fuzz
bin=$dir/x86_64-unknown-linux-gnu/release

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz missing: cargo install cargo-fuzz --locked (scripts/setup.sh --tests does)" >&2
  exit 1
fi
# libjpeg-turbo is C, built by turbojpeg-sys's build script with cmake: the
# same library whatever the Rust flags (libFuzzer's instrumentation is
# Rust's), and a minute of CPU in a cold build. The fuzz build links the
# static library the main build compiled (target/ci) when it is the version
# the fuzz crate's Cargo.lock pins, through turbojpeg-sys's own
# TURBOJPEG_SOURCE=explicit; else it builds the vendored source itself.
# Prints the library's folder, or nothing.
main_build_turbojpeg() {
  python3 - <<'PY'
import glob, os, re, tomllib
lock = tomllib.load(open("host/fuzz/Cargo.lock", "rb"))
version = next(p["version"] for p in lock["package"] if p["name"] == "turbojpeg-sys")
home = os.environ.get("CARGO_HOME") or os.path.expanduser("~/.cargo")
sources = glob.glob(f"{home}/registry/src/*/turbojpeg-sys-{version}/libjpeg-turbo/CMakeLists.txt")
pinned = re.search(r"^set\(VERSION ([0-9.]+)\)", open(sources[0]).read(), re.M) if sources else None
libs = glob.glob("target/ci/build/turbojpeg-sys-*/out/lib/libturbojpeg.a")
for lib in sorted(libs, key=os.path.getmtime, reverse=True):
    pc = os.path.join(os.path.dirname(lib), "pkgconfig", "libturbojpeg.pc")
    built = re.search(r"^Version: (\S+)$", open(pc).read(), re.M) if os.path.exists(pc) else None
    if pinned and built and built.group(1) == pinned.group(1):
        print(os.path.abspath(os.path.dirname(lib)))
        break
PY
}
if [ "$build" = 1 ]; then
  started=$SECONDS
  turbojpeg=$(main_build_turbojpeg)
  if [ -n "$turbojpeg" ]; then
    echo "fuzz.sh: libjpeg-turbo from the main build ($turbojpeg)" >&2
    export TURBOJPEG_SOURCE=explicit TURBOJPEG_LIB_DIR=$turbojpeg
  fi
  # The host's clippy wrapper is for the oxbox workspace; the fuzz crate is
  # its own workspace.
  set +e
  env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS \
    cargo fuzz build --fuzz-dir host/fuzz -s none --target-dir "$dir" 2>&1 |
    grep -vE '^\s+(Compiling|Fresh|Checking)' >&2
  built=${PIPESTATUS[0]}
  set -e
  if [ "$built" != 0 ]; then
    echo "fuzz.sh: the fuzz build failed" >&2
    exit 1
  fi
  echo "fuzz.sh: built in $((SECONDS - started)) s" >&2
fi
[ "$run" = 1 ] || exit 0

python3 scripts/fuzz-seeds.py "$dir/seeds"
# The targets run side by side, as many at a time as the machine has cores
# (each libFuzzer process is one thread): each writes its result line to a
# file, printed in the targets' order at the end.
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
fuzz_one() { # TARGET : runs it for $seconds, writes $results/TARGET (line, status)
  local t=$1 rc execs rate files result
  local corpus=$dir/corpus/$t artifacts=$dir/artifacts/$t/ log=$dir/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  # -rss_limit_mb: an input that makes a target hold 2 GiB is a failure;
  # -timeout: one input over 10 s is a hang.
  set +e
  "$bin/$t" "$corpus" "$dir/seeds/$t" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -timeout=10 -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  files=$(find "$corpus" -type f | wc -l)
  if [ "$rc" = 0 ]; then result=ok; else result="FAILED (exit $rc, log $log)"; fi
  printf '%-22s %8s %12s %10s %8s %s\n' "$t" "$seconds" "${execs:-0}" "${rate:-0}" "$files" "$result" >"$results/$t"
  if [ "$rc" != 0 ]; then
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -n 20 >"$results/$t.why" || true
  fi
}
parallel=$(nproc)
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
  fuzz_one "$t" &
done
wait
status=0
printf '%-22s %8s %12s %10s %8s %s\n' target seconds executions "exec/s" corpus result
for t in "${targets[@]}"; do
  if [ ! -f "$results/$t" ]; then
    echo "fuzz.sh: $t wrote no result" >&2
    status=1
    continue
  fi
  cat "$results/$t"
  grep -q ' ok$' "$results/$t" || status=1
  [ -f "$results/$t.why" ] && cat "$results/$t.why" >&2
done
exit "$status"
