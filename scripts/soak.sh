#!/usr/bin/env bash
# Soak: MINUTES (default 30) of mixed traffic against `oxbox serve` on
# loopback — good predictions, bad input, a plugin reload and a model reload
# each minute — with federation rounds beside it: an `oxbox aggregator
# serve` on loopback and the served site's `oxbox federate` training on a
# synthetic site folder, each round's global model promoted into the served
# model and swapped in by reload while traffic flows (a round every 150 s
# for runs of 10 minutes or more, a quarter of the run for shorter ones).
# Per-minute table: requests, reloads, rounds uploaded, the federation round
# served, p50/p99 and the server's RSS; the peak RSS of the server, the
# aggregator and `oxbox federate`.
#
# Rules (scripts/soak.py, exit 1 if any fails): no unexpected status,
# connection error or malformed answer; the server's RSS at the end at most
# 64 MiB above its RSS after the first minute; the median per-minute p99 of
# the last third at most 2 x the first third's + 50 ms; the federation job
# finished (every round trained, uploaded and promoted once, nothing
# refused or retried, no warning in the site's or aggregator's log but a
# reload deferred by the server's rate limit) and the server serving the
# final global model.
#
# Uses the release binary (target/release/oxbox, built if missing; or
# OXBOX_BIN=PATH) and the site plugins (plugins/dist: example-site for the
# traffic, canonical for the synthetic site; scripts/build-plugins.sh).
#
#   scripts/soak.sh [MINUTES] [--json OUT] [--round-every S] [--no-federation]
#   OXBOX_BIN=target/release-main/oxbox scripts/soak.sh 2
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
shift || true
bin=${OXBOX_BIN:-target/release/oxbox}
if [ ! -x "$bin" ]; then
  [ -z "${OXBOX_BIN:-}" ] || { echo "soak.sh: OXBOX_BIN=$bin is not an executable" >&2; exit 2; }
  cargo build --release --locked -p oxbox
fi
[ -f plugins/dist/example-site/plugin.toml ] && [ -f plugins/dist/canonical/plugin.toml ] ||
  bash scripts/build-plugins.sh
exec python3 scripts/soak.py "$bin" "$minutes" "$@"
