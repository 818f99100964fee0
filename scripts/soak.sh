#!/usr/bin/env bash
# Soak: MINUTES (default 30) of mixed traffic against `oxbox serve` on
# loopback (good predictions, bad input, a plugin reload and a model reload
# each minute), per-minute p50/p99 and the server's RSS, with the rules in
# scripts/soak.py (no unexpected answer, RSS growth bounded, p99 stable).
# Uses the release binary (target/release/oxbox, built if missing) and the
# example-site plugin (plugins/dist, scripts/build-plugins.sh).
#
#   scripts/soak.sh [MINUTES] [--json OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
shift || true
bin=target/release/oxbox
[ -x "$bin" ] || cargo build --release --locked -p oxbox
[ -f plugins/dist/example-site/plugin.toml ] || bash scripts/build-plugins.sh
exec python3 scripts/soak.py "$bin" "$minutes" "$@"
