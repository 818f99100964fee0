#!/usr/bin/env bash
# Builds the site plugins (plugins/) and the hostile test plugins
# (tests/guests/) for wasm32-wasip2, and packs each site plugin into
# plugins/dist/<name>/ (component + plugin.toml) with the host's
# `oxbox plugin pack`. Needs the host built: target/release/oxbox.
#   scripts/build-plugins.sh [--no-guests]
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
oxbox=./target/release/oxbox
[ -x "$oxbox" ] || cargo build --release --locked -p oxbox
# Packing compiles each component once; its cache lives in a scratch data dir.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
printf '[site]\nid = "build"\nname = "plugin build"\n[storage]\ndata_dir = "%s"\n' "$scratch" > "$scratch/oxbox.toml"
for crate in canonical example-site; do
  wasm="plugins/target/wasm32-wasip2/release/oxbox_plugin_${crate//-/_}.wasm"
  "$oxbox" --config "$scratch/oxbox.toml" plugin pack "$wasm" --out "plugins/dist/$crate" >/dev/null
  echo "plugins/dist/$crate/plugin.toml"
done
if [ "${1:-}" != "--no-guests" ]; then
  cargo build --release --locked --target wasm32-wasip2 --manifest-path tests/guests/Cargo.toml
fi
