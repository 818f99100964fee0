#!/usr/bin/env bash
# Cross-builds the oxbox binary for aarch64 (NVIDIA Jetson Orin and other
# 64-bit Arm boxes) on this x86 machine and runs it under qemu-user on real
# inputs, comparing with the x86 binary:
#   - `dicom info` on RG1 (same JSON);
#   - `preprocess` on RG1 in three transfer syntaxes (explicit VR little
#     endian, JPEG-LS lossless, JPEG 2000 lossless: the vendored CharLS and
#     OpenJPEG run cross-compiled) — tensors equal within 1e-6;
#   - `plugin run` with the example-site plugin (wasmtime compiles the
#     component to aarch64 code and runs it) — same canonical features;
#   - `predict` with the embedded demo model and the example-site plugin —
#     probabilities within 1e-5.
# Exits non-zero on any difference. Under qemu the kernels take their aarch64
# paths: the Winograd transforms' portable Rust code (the AVX2 versions are
# x86-only; NEON is part of the aarch64 baseline, so LLVM vectorises the
# portable loops with it) and gemm's NEON microkernels.
#
# Installs what it needs if missing (Debian's crossbuild-essential-arm64 and
# qemu-user-static, the rustup target for the toolchain pinned in
# rust-toolchain.toml). The build (optimised for the check, below: not the
# binary to install, which firmware-notes/README.md builds) is left as
# target/aarch64-unknown-linux-gnu/ci/oxbox-aarch64-check; a warm one
# takes seconds (CI's `target` is the shared build directory). Compares
# with the x86 binary $OXBOX_BIN (CI's target/ci/oxbox), else
# target/ci/oxbox (built if missing), and uses the corpus ($OXBOX_CORPUS,
# default tests/.corpus; tests/corpus/build.sh).
#   scripts/aarch64-check.sh              build, then compare
#   scripts/aarch64-check.sh --build      the cross build only
#   scripts/aarch64-check.sh --no-build   compare what --build left
# (CI runs the build beside its later steps, then the comparisons.)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$SECONDS
step() { printf '[aarch64-check %4ds] %s\n' $((SECONDS - started)) "$*" >&2; }
triple=aarch64-unknown-linux-gnu
build=1 compare=1
case "${1:-}" in
  --build) compare=0 ;;
  --no-build) build=0 ;;
  "") ;;
  *) echo "usage: scripts/aarch64-check.sh [--build | --no-build]" >&2; exit 2 ;;
esac
arm=$root/target/$triple/ci/oxbox-aarch64-check

build_s=0
if [ "$build" = 1 ]; then
  # 1. Tools.
  need=()
  dpkg -s crossbuild-essential-arm64 >/dev/null 2>&1 || need+=(crossbuild-essential-arm64)
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  # rustup resolves the toolchain from rust-toolchain.toml in this folder.
  rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"

  # 2. The cross build: only the binary, without the host's lint wrapper (the
  # lints ran on x86; clippy-driver would also key a second copy of oxbox).
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
  step "cross build (profile ci, $triple)"
  t=$SECONDS
  # The check's build optimises what the comparisons exercise and nothing
  # else (the cold build's times at level 1 and 0 are in the README): the
  # crates whose arithmetic is compared (oxbox-dicom's preprocessing,
  # oxbox-model's kernels, which LLVM vectorises with NEON only from
  # opt-level 2) at the release level, gemm's crates at 1 and every other
  # dependency at 0 (wasmtime, candle and the codecs run a few times on
  # small inputs here). gemm-f16's aarch64 half-precision kernels are inline
  # assembly that compiles only when its target-feature helpers are inlined,
  # which opt-level 0 does not do; the gemm family stays at 1 together. The
  # results do not depend on it: Rust computes the same values at every
  # level (no fast-math), and the codecs compared decode losslessly, in
  # integers. A binary to install on a Jetson is built at the release level
  # (see firmware-notes/README.md).
  # It is CI's `ci` profile (the root Cargo.toml) with these levels: the
  # profile's level, not `package."*"`, so that build scripts and proc macros
  # keep theirs and are shared with CI's x86 build.
  check_profile=(--profile ci --config profile.ci.opt-level=0)
  for crate in oxbox-dicom oxbox-model; do
    check_profile+=(--config "profile.ci.package.$crate.opt-level=3")
  done
  for crate in gemm gemm-common gemm-f16 gemm-f32 gemm-f64 gemm-c32 gemm-c64; do
    check_profile+=(--config "profile.ci.package.$crate.opt-level=1")
  done
  env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS \
    cargo build --locked --target "$triple" -p oxbox --bin oxbox "${check_profile[@]}"
  build_s=$((SECONDS - t))
  # Renamed, so that nobody installs the check's build on a box (cargo links
  # it again on the next run, even when nothing changed).
  mv -f "$root/target/$triple/ci/oxbox" "$arm"
fi
[ -x "$arm" ] || { echo "aarch64-check: no $arm (scripts/aarch64-check.sh --build)" >&2; exit 1; }
# ELF machine 0xb7 = EM_AARCH64.
[ "$(od -An -tx1 -j18 -N2 "$arm" | tr -d ' ')" = b700 ] || {
  echo "aarch64-check: $arm is not an aarch64 executable" >&2
  exit 1
}
if [ "$compare" = 0 ]; then
  step "cross build done in ${build_s} s: $arm"
  exit 0
fi
x86=${OXBOX_BIN:-$root/target/ci/oxbox}
if [ ! -x "$x86" ]; then
  [ -z "${OXBOX_BIN:-}" ] || { echo "aarch64-check: OXBOX_BIN=$x86 is not an executable" >&2; exit 1; }
  step "building the x86 binary to compare with"
  RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver" \
    CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" \
    cargo build --profile ci --locked -p oxbox
fi

# 3. Runs on real inputs.
corpus=${OXBOX_CORPUS:-$root/tests/.corpus}
[ -d "$corpus/encoded" ] || { echo "aarch64-check: no corpus in $corpus (tests/corpus/build.sh)" >&2; exit 1; }
plugin=$root/plugins/dist/example-site/plugin.toml
[ -f "$plugin" ] || { echo "aarch64-check: no $plugin (scripts/build-plugins.sh)" >&2; exit 1; }
record=$root/samples/example-site-record.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A config for both binaries: state in the scratch folder, the example-site
# plugin, the embedded demo model.
for arch in x86 arm; do
  mkdir -p "$work/$arch"
  cat >"$work/$arch/oxbox.toml" <<TOML
[site]
id = "aarch64-check"
name = "aarch64 check"
[storage]
data_dir = "$work/$arch/data"
[model]
device = "cpu"
[[plugins]]
path = "$plugin"
TOML
done
run_x86() { "$x86" --config "$work/x86/oxbox.toml" "$@"; }
run_arm() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$arm" --config "$work/arm/oxbox.toml" "$@"; }
# Compares two outputs: .npy tensors (float32, same shape, max |a-b|) or
# JSON documents (same structure; numbers within the tolerance; keys named
# in IGNORE, like timings and request ids, are skipped). Python's standard
# library only.
compare() {
  python3 - "$@" <<'PY'
import json, struct, sys
from array import array
kind, tol, a, b = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
IGNORE = {"timings_ms", "request_id", "elapsed_ms"}
def npy(path):
    raw = open(path, "rb").read()
    assert raw[:6] == b"\x93NUMPY", f"{path}: not .npy"
    major = raw[6]
    if major == 1:
        (n,), start = struct.unpack("<H", raw[8:10]), 10
    else:
        (n,), start = struct.unpack("<I", raw[8:12]), 12
    header = raw[start:start + n].decode("latin1")
    values = array("f")
    values.frombytes(raw[start + n:])
    return header, values
worst = 0.0
def walk(x, y, where):
    global worst
    if isinstance(x, dict) and isinstance(y, dict):
        keys = set(x) - IGNORE
        if keys != set(y) - IGNORE:
            sys.exit(f"{where}: keys differ: {sorted(keys ^ (set(y) - IGNORE))}")
        for k in sorted(keys):
            walk(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            sys.exit(f"{where}: lengths {len(x)} != {len(y)}")
        for i, (p, q) in enumerate(zip(x, y)):
            walk(p, q, f"{where}[{i}]")
    elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        worst = max(worst, abs(x - y))
        if abs(x - y) > tol:
            sys.exit(f"{where}: {x} != {y} (tolerance {tol})")
    elif x != y:
        sys.exit(f"{where}: {x!r} != {y!r}")
if kind == "npy":
    (ha, va), (hb, vb) = npy(a), npy(b)
    if ha != hb or len(va) != len(vb):
        sys.exit(f"headers differ: {ha!r} vs {hb!r}")
    worst = max((abs(p - q) for p, q in zip(va, vb)), default=0.0)
    if not worst <= tol:
        sys.exit(f"max |x86 - aarch64| = {worst} > {tol}")
    print(f"{len(va)} values, max |x86 - aarch64| = {worst:.3g}")
else:
    walk(json.load(open(a)), json.load(open(b)), "$")
    print(f"max |x86 - aarch64| = {worst:.3g}")
PY
}
exec 3>&2 # the timings, whatever the command's stderr is redirected to
timed() { # LABEL COMMAND… : runs and prints its wall time
  local label=$1 t0
  shift
  t0=${EPOCHREALTIME/[.,]/}
  "$@"
  local us=$((${EPOCHREALTIME/[.,]/} - t0))
  printf '  %-44s %4d.%02d s\n' "$label" $((us / 1000000)) $((us % 1000000 / 10000)) >&3
}
failed=0
check() { # WHAT KIND TOLERANCE X86_FILE ARM_FILE
  local what=$1 result
  shift
  if result=$(compare "$@" 2>&1); then
    step "ok   $what: $result"
  else
    step "FAIL $what: $result"
    failed=1
  fi
}
rg1=$corpus/encoded/rg1_explicit_le.dcm
step "dicom info"
timed "x86 dicom info" run_x86 dicom info "$rg1" >"$work/x86/info.json"
timed "aarch64 dicom info (qemu)" run_arm dicom info "$rg1" >"$work/arm/info.json"
check "dicom info" json 0 "$work/x86/info.json" "$work/arm/info.json"
for syntax in explicit_le jpegls_lossless j2k_lossless_gdcm; do
  in=$corpus/encoded/rg1_$syntax.dcm
  timed "x86 preprocess $syntax" run_x86 preprocess --dicom "$in" --out "$work/x86/$syntax.npy" >/dev/null
  timed "aarch64 preprocess $syntax (qemu)" run_arm preprocess --dicom "$in" --out "$work/arm/$syntax.npy" >/dev/null
  check "preprocess $syntax" npy 1e-6 "$work/x86/$syntax.npy" "$work/arm/$syntax.npy"
done
step "plugin run"
timed "x86 plugin run" run_x86 plugin run "$plugin" --emr "$record" >"$work/x86/plugin.json"
timed "aarch64 plugin run (qemu)" run_arm plugin run "$plugin" --emr "$record" >"$work/arm/plugin.json"
check "plugin run example-site" json 1e-9 "$work/x86/plugin.json" "$work/arm/plugin.json"
step "predict"
timed "x86 predict" run_x86 predict --dicom "$rg1" --emr "$record" >"$work/x86/predict.json" 2>/dev/null
timed "aarch64 predict (qemu)" run_arm predict --dicom "$rg1" --emr "$record" >"$work/arm/predict.json" 2>/dev/null
check "predict (demo model, example-site plugin)" json 1e-5 "$work/x86/predict.json" "$work/arm/predict.json"

if [ "$failed" -ne 0 ]; then
  echo "aarch64-check: the aarch64 binary differs from the x86 one (above)" >&2
  exit 1
fi
if [ "$build" = 1 ]; then
  step "aarch64 binary agrees with x86 (cross build ${build_s} s, whole check $((SECONDS - started)) s)"
else
  step "aarch64 binary agrees with x86 (comparisons $((SECONDS - started)) s)"
fi
