#!/usr/bin/env bash
# Checks the systemd units shipped in firmware-notes/ (oxbox.service,
# oxbox-federate.service, oxbox-aggregator.service, and oxbox.service with
# each GPU drop-in of oxbox.service.d/): `systemd-analyze verify` (syntax,
# directives, the ExecStart binary) and `systemd-analyze security --offline`
# (the hardening). Prints each unit's exposure level and fails when one is
# above the threshold: 1.4 on systemd's 0-10 scale ("OK" ends at 4.9) for
# every unit and drop-in (they are at 1.1-1.4 today; the main cost left is
# the network, which a server needs, and the writable executable memory
# that wasmtime's compiled plugins need). `verify` needs ExecStart's binary to exist: the
# units are checked as copies whose /usr/local/bin/oxbox is the binary built
# here (BINARY, else $OXBOX_BIN, else target/release/oxbox), in a scratch
# folder (drop-ins beside them).
# Needs systemd's systemd-analyze (Debian: the `systemd` package), not a
# running systemd.
#   scripts/systemd-check.sh [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
binary=$(readlink -f "${1:-${OXBOX_BIN:-target/release/oxbox}}")
[ -x "$binary" ] || { echo "systemd-check: no binary at $binary" >&2; exit 1; }
threshold=14 # exposure × 10, as --threshold takes it
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
check() { # NAME DIR UNIT
  local name=$1 dir=$2 unit=$3 out level
  if ! out=$(systemd-analyze verify --man=no "$dir/$unit" 2>&1) || [ -n "$out" ]; then
    echo "systemd-check: FAIL verify $name:" >&2
    printf '%s\n' "$out" >&2
    failed=1
    return
  fi
  out=$(systemd-analyze security --offline=true --no-pager "$dir/$unit" 2>&1) || true
  level=$(printf '%s\n' "$out" | grep -o 'Overall exposure level for [^:]*: [0-9.]* [A-Z]*' | sed 's/.*: //')
  if [ -z "$level" ]; then
    printf '%s\n' "$out" >&2
    echo "systemd-check: FAIL security $name: no exposure level" >&2
    failed=1
  elif ! systemd-analyze security --offline=true --threshold=$threshold "$dir/$unit" >/dev/null 2>&1; then
    echo "systemd-check: FAIL $name: exposure $level, above $((threshold / 10)).$((threshold % 10))" >&2
    failed=1
  else
    echo "systemd-check: ok   $name: verified, exposure $level (threshold $((threshold / 10)).$((threshold % 10)))" >&2
  fi
}
copy() { # DIR UNIT: the unit with ExecStart's binary replaced
  mkdir -p "$1"
  sed "s|/usr/local/bin/oxbox|$binary|g" "$root/firmware-notes/$2" >"$1/$2"
}
for unit in oxbox.service oxbox-federate.service oxbox-aggregator.service; do
  copy "$work/$unit" "$unit"
  check "$unit" "$work/$unit" "$unit"
done
for dropin in firmware-notes/oxbox.service.d/*.conf; do
  name=$(basename "$dropin")
  copy "$work/$name" oxbox.service
  mkdir -p "$work/$name/oxbox.service.d"
  cp "$dropin" "$work/$name/oxbox.service.d/"
  check "oxbox.service + $name" "$work/$name" oxbox.service
done
# The drop-in must really apply: the GPU variant has the devices open.
gpu=$(systemd-analyze security --offline=true "$work/gpu.conf/oxbox.service" 2>&1) || true
if ! grep -q 'char-nvidia-uvm:rw' <<<"$gpu"; then
  echo "systemd-check: FAIL the drop-in gpu.conf was not applied" >&2
  failed=1
fi
exit "$failed"
