#!/usr/bin/env bash
# From C-STORE to result: RG1_UNCR.dcm (7.2 MB, 1955×1841 15-bit chest CR,
# Explicit VR Little Endian) sent by dcmtk's storescu to `oxbox serve`'s
# DICOM listener, its EMR record already posted (POST /v1/emr), timed until
# GET /v1/studies/{uid}/result says `done`, over N studies (each its own
# study UID and accession number, sent one after the other); beside it the
# HTTP path (POST /v1/predict, same film, same record, same server,
# `oxbox bench --url`, N sequential requests). Prints min, p50, p90, p99
# and max of both (nearest rank), then where the DICOM path's time goes,
# per stage (p50 and p99), from the server's debug log and the client's
# clock:
#   storescu start   storescu launched → association accepted (process
#                    start, dictionary, reading the file, connect, A-ASSOCIATE)
#   transfer         C-STORE-RQ → last data PDV (the 7.2 MB on loopback)
#   parse            the bounded parser over the received data set
#   keep             temporary file, write, fsync, rename, folder fsync,
#                    database row, claim
#   to inference     study kept and claimed → inference task running
#   inference        as `POST /v1/predict` (decode, plugins, model, audit)
#   record           the result into the studies database
#   poll             result recorded → the client's next GET sees it
# The model is the ResNet-18 package of scripts/bench.sh (models/demo, `oxbox
# model init`), the plugin the example site's.
#   scripts/bench-dicom.sh [N]     (default 50; OXBOX_BIN: another oxbox binary)
# Measure on an idle machine: `flock /tmp/oxbox-build.lock scripts/bench-dicom.sh 50`.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50}
oxbox=${OXBOX_BIN:-./target/release/oxbox}
[ -x "$oxbox" ] || { echo "build first: cargo build --release -p oxbox" >&2; exit 1; }
[ -f plugins/dist/example-site/plugin.toml ] || bash scripts/build-plugins.sh --no-guests >/dev/null
[ -f models/demo/model.toml ] || "$oxbox" model init --out models/demo --backbone resnet18 >/dev/null
uncr=$(grep -m1 '/RG1_UNCR.dcm$' "${OXBOX_CORPUS:-tests/.corpus}/files.txt")
record=samples/example-site-record.json
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s\n' "$token" > "$work/emr-token"
chmod 600 "$work/emr-token"
cat > "$work/oxbox.toml" <<EOF
[site]
id = "bench"
name = "bench"
[server]
listen = "127.0.0.1:0"
[storage]
data_dir = "$work/data"
[model]
package = "$(pwd)/models/demo"
threads = 2
[[plugins]]
path = "$(pwd)/plugins/dist/example-site/plugin.toml"
[dicom]
enabled = true
listen = "127.0.0.1:0"
allowed_calling_ae_titles = ["STORESCU"]
emr_token_file = "$work/emr-token"
min_free_disk_mib = 1
EOF
# The listener's and the studies' debug lines time each stage.
RUST_LOG="warn,oxbox=info,oxbox::plugins::bindings=warn,oxbox::dimse=debug,oxbox::serve::studies=debug" \
  "$oxbox" --config "$work/oxbox.toml" serve > "$work/out" 2> "$work/log" &
server=$!
for _ in $(seq 200); do [ "$(wc -l < "$work/out")" -ge 2 ] && break; sleep 0.1; done
http=$(sed -n 's|^listening on http://||p' "$work/out")
dport=$(sed -n 's|^dicom listening on .*:||p' "$work/out")
for i in $(seq "$n"); do
  cp "$uncr" "$work/s$i.dcm"
  dcmodify -nb -m "(0020,000d)=1.2.826.0.1.3680043.10.777.$i" \
    -m "(0008,0018)=1.2.826.0.1.3680043.10.777.$i.1" \
    -m "(0008,0050)=BENCH$i" "$work/s$i.dcm"
done
python3 - "$http" "$dport" "$n" "$work" "$token" "$record" <<'PY'
import datetime, http.client, json, math, re, subprocess, sys, time
host, dport, n, work, token, record = sys.argv[1:7]
n = int(n)
h, p = host.rsplit(":", 1)
emr = json.load(open(record))
conn = None
def call(method, path, body=None, headers=None):
    # One kept-alive connection: the polling costs the server little.
    global conn
    for attempt in range(2):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(h, int(p), timeout=60)
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            conn = None
            if attempt:
                raise
times, starts, exits, seen = [], [], [], []
for i in range(1, n + 1):
    s, _ = call("POST", "/v1/emr", json.dumps({"accession_number": f"BENCH{i}", "emr": emr}),
                {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert s == 202, s
    study = f"1.2.826.0.1.3680043.10.777.{i}"
    starts.append(time.time())
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", "OXBOX", "-xe", "127.0.0.1", dport, f"{work}/s{i}.dcm"], check=True)
    exits.append(time.time())
    while True:
        s, data = call("GET", f"/v1/studies/{study}/result")
        state = json.loads(data)["state"] if s == 200 else None
        if state == "done":
            break
        assert state in ("waiting", "inferring"), (s, data)
        time.sleep(0.002)
    times.append((time.perf_counter() - t0) * 1e3)
    seen.append(time.time())

# Stages, from the server's debug log (one study after the other: the k-th
# line of each kind is the k-th study's).
stamp = re.compile(r"^(\S+Z)\s+\w+\s+(.*)$")
def when(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
events = {"accepted": [], "received": [], "kept": [], "handled": [], "run": []}
for line in open(f"{work}/log", encoding="utf-8", errors="replace"):
    m = stamp.match(line.strip())
    if not m:
        continue
    t, msg = when(m.group(1)), m.group(2)
    if re.search(r"dicom: association from .* accepted", msg):
        events["accepted"].append(t)
    elif (x := re.search(r"data set of \d+ bytes received in ([\d.]+) ms", msg)):
        events["received"].append(float(x.group(1)))
    elif (x := re.search(r"parsed in ([\d.]+) ms, kept \(.*\) in ([\d.]+) ms", msg)):
        events["kept"].append((t, float(x.group(1)), float(x.group(2))))
    elif re.search(r"instance handled in", msg):
        events["handled"].append(t)
    elif (x := re.search(r"instance read in ([\d.]+) ms, inferred in ([\d.]+) ms, result recorded in ([\d.]+) ms", msg)):
        events["run"].append((t, *map(float, x.groups())))
stages = {}
if all(len(v) == n for v in events.values()):
    stages = {k: [] for k in ("storescu start", "transfer", "parse", "keep", "to inference",
                              "inference", "record", "poll", "storescu end (release, exit)")}
    for k in range(n):
        done_at, read, inferred, recorded = events["run"][k]
        started_at = done_at - (read + inferred + recorded) / 1e3
        stages["storescu start"].append((events["accepted"][k] - starts[k]) * 1e3)
        stages["transfer"].append(events["received"][k])
        kept_at, parse, keep = events["kept"][k]
        stages["parse"].append(parse)
        stages["keep"].append(keep)
        stages["to inference"].append((started_at - kept_at) * 1e3)
        stages["inference"].append(read + inferred)
        stages["record"].append(recorded)
        stages["poll"].append((seen[k] - done_at) * 1e3)
        stages["storescu end (release, exit)"].append((exits[k] - events["handled"][k]) * 1e3)
else:
    print("no stage breakdown: the server log lacks the debug lines "
          + str({k: len(v) for k, v in events.items()}), file=sys.stderr)
json.dump({"times": times, "stages": stages}, open(f"{work}/dicom.json", "w"))
PY
"$oxbox" bench --url "http://$http" --dicom "$uncr" --emr "$record" --requests "$n" --concurrency 1 \
  > "$work/http.json"
python3 - "$work" <<'PY'
import json, math, sys
work = sys.argv[1]
dicom = json.load(open(f"{work}/dicom.json"))
http = json.load(open(f"{work}/http.json"))
def rank(ms, q):
    # Nearest rank, as `oxbox bench` computes its percentiles.
    return ms[min(len(ms), max(1, math.ceil(q * len(ms)))) - 1]
def cells(values):
    return " | ".join("–" if v is None else f"{v:.1f} ms" for v in values)
times = sorted(dicom["times"])
print("| path | n | min | p50 | p90 | p99 | max |")
print("|---|---|---|---|---|---|---|")
print(f"| DICOM C-STORE (storescu) → result (GET, polled every 2 ms) | {len(times)} | "
      + cells([times[0], rank(times, .5), rank(times, .9), rank(times, .99), times[-1]]) + " |")
print(f"| HTTP POST /v1/predict (oxbox bench --url) | {http['requests']} | "
      + cells([http.get(k) for k in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")]) + " |")
if dicom["stages"]:
    print()
    print("| DICOM stage | p50 | p99 |")
    print("|---|---|---|")
    for name, ms in dicom["stages"].items():
        ms.sort()
        print(f"| {name} | {rank(ms, .5):.1f} ms | {rank(ms, .99):.1f} ms |")
    print("(storescu's end overlaps the inference: the study is claimed once its data set is kept)")
PY
