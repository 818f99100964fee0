#!/usr/bin/env bash
# From C-STORE to result: RG1_UNCR.dcm (7.2 MB, 1955×1841 15-bit chest CR,
# Explicit VR Little Endian) sent by dcmtk's storescu to `oxbox serve`'s
# DICOM listener, its EMR record already posted (POST /v1/emr), timed until
# GET /v1/studies/{uid}/result says `done`; p50 and p99 over N studies (each
# its own study UID and accession number, sent one after the other), beside
# the HTTP path (POST /v1/predict, same film, same record, same server,
# `oxbox bench --url`, N sequential requests).
# The model is the ResNet-18 package of scripts/bench.sh (models/demo, `oxbox
# model init`), the plugin the example site's.
#   scripts/bench-dicom.sh [N]     (default 50)
# The time includes storescu's own start (a process per study) and the
# polling interval (2 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50}
oxbox=./target/release/oxbox
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
import http.client, json, subprocess, sys, time
host, dport, n, work, token, record = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
h, p = host.rsplit(":", 1)
emr = json.load(open(record))
def call(method, path, body=None, headers=None):
    c = http.client.HTTPConnection(h, int(p), timeout=60)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse(); data = r.read(); c.close()
    return r.status, data
times = []
for i in range(1, n + 1):
    s, _ = call("POST", "/v1/emr", json.dumps({"accession_number": f"BENCH{i}", "emr": emr}),
                {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert s == 202, s
    study = f"1.2.826.0.1.3680043.10.777.{i}"
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", "OXBOX", "-xe", "127.0.0.1", dport, f"{work}/s{i}.dcm"], check=True)
    while True:
        s, data = call("GET", f"/v1/studies/{study}/result")
        state = json.loads(data)["state"] if s == 200 else None
        if state == "done":
            break
        assert state in ("waiting", "inferring"), (s, data)
        time.sleep(0.002)
    times.append((time.perf_counter() - t0) * 1e3)
times.sort()
q = lambda f: times[min(len(times) - 1, int(round(f * (len(times) - 1))))]
print(f"| DICOM C-STORE → result | {n} | {q(0.5):.1f} ms | {q(0.99):.1f} ms |")
PY
"$oxbox" bench --url "http://$http" --dicom "$uncr" --emr "$record" --requests "$n" --concurrency 1
