#!/usr/bin/env bash
# Builds the site plugins of the plugins/ workspace for wasm32-wasip2 and packs
# each into plugins/dist/<folder>/ (component + plugin.toml) with the host's
# `oxbox plugin pack`.
#   scripts/build-plugins.sh [NAME] [--sign-key KEY.pk8] [--guests]
# NAME: one plugin (its folder under plugins/, e.g. `my-site`, or its crate
# name): build and pack just that one. Without NAME: every member of
# plugins/Cargo.toml that is a plugin (a cdylib crate; `emr-schema` is a
# library), found with `cargo metadata`, nothing hard-coded.
# --sign-key KEY.pk8: also sign each packed manifest with this private key
# (`oxbox plugin pack --sign-key`; from `oxbox keys generate`). Without it,
# packing removes an old plugin.toml.sig: a new manifest needs a new signature.
# --guests: also build the hostile test plugins (tests/guests/, for the tests).
#
# The host is never built here: packing uses $OXBOX_BIN if set (CI's
# target/ci/oxbox), else target/release/oxbox, else `oxbox` on PATH;
# without any it stops and says to build it (`cargo build --release -p oxbox`).
# --locked is used while plugins/Cargo.lock is up to date; once a member was
# added (`oxbox plugin new`), the lock is first updated for the workspace's
# own crates (`cargo update --workspace`) and the script says so.
set -euo pipefail
usage="usage: scripts/build-plugins.sh [NAME] [--sign-key KEY.pk8] [--guests]"

name="" guests=0 sign_key=""
while [ $# -gt 0 ]; do
  case "$1" in
    --guests) guests=1 ;;
    --no-guests) guests=0 ;;
    --sign-key|--sign-key=*)
      if [ "$1" = --sign-key ]; then
        [ $# -ge 2 ] || { echo "error: --sign-key needs a key file ($usage)" >&2; exit 2; }
        sign_key=$2; shift
      else
        sign_key=${1#--sign-key=}
      fi
      [ -f "$sign_key" ] || { echo "error: --sign-key $sign_key: no such file" >&2; exit 2; }
      # The script works from the repository root: make the path absolute.
      sign_key=$(CDPATH= cd -- "$(dirname -- "$sign_key")" && pwd)/$(basename -- "$sign_key") ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 ($usage)" >&2; exit 2 ;;
    *) [ -z "$name" ] || { echo "error: one plugin name at most" >&2; exit 2; }; name=$1 ;;
  esac
  shift
done
# A relative CARGO_TARGET_DIR names a folder from where the script was
# started: make it absolute before moving to the repository root.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  case "$CARGO_TARGET_DIR" in
    /*) ;;
    *) CARGO_TARGET_DIR=$(pwd)/$CARGO_TARGET_DIR; export CARGO_TARGET_DIR ;;
  esac
fi
cd "$(dirname "$0")/.."

if [ -n "${OXBOX_BIN:-}" ]; then
  [ -x "$OXBOX_BIN" ] || { echo "error: OXBOX_BIN=$OXBOX_BIN is not an executable" >&2; exit 1; }
  oxbox=$OXBOX_BIN
elif [ -x ./target/release/oxbox ]; then
  oxbox=./target/release/oxbox
elif command -v oxbox >/dev/null 2>&1; then
  oxbox=$(command -v oxbox)
else
  echo "error: no oxbox binary to pack with: build the host first (cargo build --release -p oxbox)" >&2
  exit 1
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

manifest=plugins/Cargo.toml
locked=--locked
if ! cargo metadata --format-version 1 --locked --manifest-path "$manifest" >/dev/null 2>&1; then
  echo "plugins/Cargo.lock is out of date (a member was added or changed): updating it for the workspace's own crates (commit it)" >&2
  cargo update --workspace --offline --manifest-path "$manifest" 2>/dev/null ||
    cargo update --workspace --manifest-path "$manifest"
fi

# Plugin members: (folder, crate) for each cdylib member of the workspace.
plugins=()
while IFS= read -r toml; do
  grep -Eq '^crate-type *= *\[[^]]*"cdylib"' "$toml" || continue
  folder=$(basename "$(dirname "$toml")")
  crate=$(sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$toml" | head -n 1)
  plugins+=("$folder:$crate")
done < <(cargo metadata --no-deps --format-version 1 $locked --manifest-path "$manifest" |
  grep -o '"manifest_path":"[^"]*"' | sed 's/^"manifest_path":"\(.*\)"$/\1/')

[ ${#plugins[@]} -gt 0 ] || { echo "error: plugins/Cargo.toml has no plugin members" >&2; exit 2; }
if [ -n "$name" ]; then
  chosen=()
  for p in "${plugins[@]}"; do
    if [ "${p%%:*}" = "$name" ] || [ "${p#*:}" = "$name" ]; then chosen=("$p"); fi
  done
  if [ ${#chosen[@]} -eq 0 ]; then
    echo "error: no plugin $name in plugins/Cargo.toml's members (plugins: $(printf '%s ' "${plugins[@]%%:*}"))" >&2
    exit 2
  fi
  plugins=("${chosen[@]}")
fi

packages=()
for p in "${plugins[@]}"; do packages+=(-p "${p#*:}"); done
cargo build --release $locked --target wasm32-wasip2 --manifest-path "$manifest" "${packages[@]}"

# Packing compiles each component once; its cache lives in a scratch data dir.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
printf '[site]\nid = "build"\nname = "plugin build"\n[storage]\ndata_dir = "%s"\n' "$scratch" > "$scratch/oxbox.toml"
for p in "${plugins[@]}"; do
  folder=${p%%:*} crate=${p#*:}
  wasm="${CARGO_TARGET_DIR:-plugins/target}/wasm32-wasip2/release/${crate//-/_}.wasm"
  sign=()
  [ -z "$sign_key" ] || sign=(--sign-key "$sign_key")
  "$oxbox" --config "$scratch/oxbox.toml" plugin pack "$wasm" --out "plugins/dist/$folder" ${sign[@]+"${sign[@]}"} >/dev/null
  echo "plugins/dist/$folder/plugin.toml"
done
if [ "$guests" = 1 ]; then
  cargo build --release --locked --target wasm32-wasip2 --manifest-path tests/guests/Cargo.toml
fi
