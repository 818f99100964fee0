#!/usr/bin/env bash
# Installs what building oxbox needs on a Debian/Ubuntu machine with Rust:
# a C/C++ toolchain, cmake and nasm (libjpeg-turbo, CharLS and OpenJPEG are
# built from the sources vendored in their -sys crates; nothing is downloaded
# at build time). With --tests, also what the test suite needs: dcmtk and
# GDCM (re-encoders), dicom3tools (dciodvfy), Orthanc (a real PACS peer
# for the DICOM listener's test; its own service is stopped and disabled),
# GNU time (peak RSS of the
# binary under test), openssl (the aggregator's TLS test certificate),
# systemd-analyze, the aarch64 cross toolchain and qemu-user
# (scripts/systemd-check.sh, aarch64-check.sh), the
# reference venv (shared/reference), scikit-learn (target/py-eval) and
# openapi-spec-validator (target/py-openapi).
#   scripts/setup.sh [--tests]
# --tests is two halves, which scripts/test.sh runs apart: --tests-system
# (the packages and rustup targets, needed before anything builds) and
# --tests-tools (the Python venvs and cargo-fuzz, needed only once the
# tests start: test.sh installs them beside the main build).
set -euo pipefail
tests=0 system=1 tools=0
case "${1:-}" in
  "") ;;
  --tests) tests=1 tools=1 ;;
  --tests-system) tests=1 ;;
  --tests-tools) system=0 tools=1 ;;
  *) echo "usage: scripts/setup.sh [--tests | --tests-system | --tests-tools]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

# The packages and rustup targets: everything a build needs.
install_system() {
  need=()
  command -v cmake >/dev/null || need+=(cmake)
  command -v nasm >/dev/null || need+=(nasm)
  command -v g++ >/dev/null || need+=(g++)
  command -v make >/dev/null || need+=(make)
  if [ "$tests" = 1 ]; then
    command -v dcmconv >/dev/null || need+=(dcmtk)
    command -v gdcmconv >/dev/null || need+=(libgdcm-tools)
    # The result SR is validated with dicom3tools' dciodvfy (tests/e2e/sr.rs);
    # dcmtk's dcmdump, dsrdump and storescp check and receive it.
    command -v dciodvfy >/dev/null || need+=(dicom3tools)
    # tests/e2e/orthanc.rs starts Debian's Orthanc itself, on free loopback
    # ports, with a configuration of its own.
    [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
    [ -x /usr/bin/time ] || need+=(time)
    # The aggregator's TLS test makes a self-signed certificate with it.
    command -v openssl >/dev/null || need+=(openssl)
    # The edge-box checks: systemd-analyze (the units), the aarch64 cross
    # toolchain and qemu-user (scripts/aarch64-check.sh).
    command -v systemd-analyze >/dev/null || need+=(systemd)
    dpkg -s crossbuild-essential-arm64 >/dev/null 2>&1 || need+=(crossbuild-essential-arm64)
    command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The package starts its own Orthanc service (DICOM 4242, HTTP 8042) where
    # services may start: the tests need none, so it is stopped and disabled.
    if [[ " ${need[*]} " == *" orthanc "* ]]; then
      if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now orthanc.service >/dev/null 2>&1 || true
      else
        $sudo /etc/init.d/orthanc stop >/dev/null 2>&1 || true
        $sudo update-rc.d orthanc disable >/dev/null 2>&1 || true
      fi
    fi
  fi
  # The toolchain pinned in rust-toolchain.toml, with rustfmt and clippy.
  rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
  # Site plugins are WebAssembly components.
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
  # The Jetson / aarch64 cross build (scripts/aarch64-check.sh).
  if [ "$tests" = 1 ]; then
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu ||
      rustup target add aarch64-unknown-linux-gnu
  fi
}

# What only the tests use: the Python venvs and cargo-fuzz.
install_tools() {
  # The evaluation test checks oxbox's AUCs against scikit-learn's
  # roc_auc_score, computed independently on the same scores.
  if ! target/py-eval/bin/python -c 'import sklearn' 2>/dev/null; then
    echo "setup: creating target/py-eval (scikit-learn)" >&2
    rm -rf target/py-eval
    python3 -m venv target/py-eval
    target/py-eval/bin/pip install -q 'scikit-learn>=1.5,<2'
  fi
  # Every OpenAPI document the repository ships is checked by an independent
  # validator (what client generators trip over), not only by our own tests.
  if ! target/py-openapi/bin/python -c 'import openapi_spec_validator' 2>/dev/null; then
    echo "setup: creating target/py-openapi (openapi-spec-validator)" >&2
    rm -rf target/py-openapi
    python3 -m venv target/py-openapi
    target/py-openapi/bin/pip install -q 'openapi-spec-validator>=0.9,<0.10'
  fi
  # The fuzz smoke run (scripts/fuzz.sh) builds with cargo-fuzz (libFuzzer).
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.2 --locked
  fi
}

[ "$system" = 0 ] || install_system
[ "$tools" = 0 ] || install_tools
