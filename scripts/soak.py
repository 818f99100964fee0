#!/usr/bin/env python3
"""Soak test: MINUTES of mixed traffic against a real `oxbox serve` on
loopback, with per-minute latency and memory figures and pass/fail rules.

Traffic (Python standard library only):
  * GOOD clients (default 3) POST the sample case (samples/) to /v1/predict
    in a loop, pausing PAUSE_S between requests: every answer must be 200;
  * one client sends bad input in turn (a truncated DICOM -> 422, a broken
    multipart -> 400, deeply nested EMR JSON -> 400, invalid UTF-8 -> 400,
    a wrong media type -> 415, a 10 GiB Content-Length -> 413), each
    answered with its own status and application/problem+json;
  * every minute a plugin reload (POST /v1/admin/plugins/reload) and, half a
    minute later, a model reload (POST /v1/admin/model/reload): both 200.

Every 5 s the server's resident size (VmRSS) is sampled from /proc.
Rules (exit 1 if any fails):
  * no unexpected status, connection error or malformed answer;
  * RSS growth: the last minute's RSS exceeds the RSS at the end of the
    warm-up (minute 1; for runs under 3 minutes the first sample) by at
    most RSS_GROWTH_MIB (default 64 MiB);
  * p99 stable: for runs of 3 minutes or more, the median of the per-minute
    p99 over the last third of the run is at most 2x that of the first
    third plus 50 ms (a shared machine's noise is allowed; a trend that
    doubles is not). Shorter runs check the rule over minutes 1 and last.

Usage: scripts/soak.py OXBOX_BINARY MINUTES [--json OUT]
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "oxbox-soak-boundary"
TOKEN = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def multipart(parts):
    body = b""
    for name, media, data in parts:
        body += (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename=\"{name}\"\r\nContent-Type: {media}\r\n\r\n"
        ).encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.latencies = {}  # minute -> [ms]
        self.counts = {}  # minute -> {kind: n}
        self.errors = []
        self.rss = {}  # minute -> [bytes]

    def minute(self):
        return int((time.monotonic() - self.started) // 60)

    def count(self, kind):
        with self.lock:
            c = self.counts.setdefault(self.minute(), {})
            c[kind] = c.get(kind, 0) + 1

    def latency(self, ms):
        with self.lock:
            self.latencies.setdefault(self.minute(), []).append(ms)

    def error(self, text):
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(f"[{time.monotonic() - self.started:7.1f}s] {text}")
            c = self.counts.setdefault(self.minute(), {})
            c["error"] = c.get("error", 0) + 1


def exchange(port, method, path, headers, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        for name, value in headers.items():
            conn.putheader(name, value)
        if "Content-Length" not in headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data
    finally:
        conn.close()


def good_client(port, body, stats, stop, pause):
    while not stop.is_set():
        started = time.monotonic()
        try:
            status, _, data = exchange(port, "POST", "/v1/predict", {"Content-Type": MULTIPART}, body)
        except Exception as e:  # noqa: BLE001 - any failure is a finding
            stats.error(f"good prediction: {type(e).__name__}: {e}")
            time.sleep(1)
            continue
        ms = (time.monotonic() - started) * 1000
        if status == 200 and json.loads(data).get("request_id"):
            stats.latency(ms)
            stats.count("good")
        else:
            stats.error(f"good prediction: {status} {data[:200]!r}")
        time.sleep(pause)


def bad_inputs(dicom, record):
    deep = b"{\"emr\":" + b"[" * 50_000 + b"]" * 50_000 + b"}"
    bad_utf8 = record.replace(b"DOE", b"\xffOE")
    return [
        ("truncated DICOM", MULTIPART, multipart([("dicom", "application/dicom", dicom[:2000]), ("emr", "application/json", record)]), 422),
        ("broken multipart", MULTIPART, multipart([("emr", "application/json", record)])[:-20], 400),
        ("nested JSON", "application/json", deep, 400),
        ("invalid UTF-8", MULTIPART, multipart([("dicom", "application/dicom", dicom), ("emr", "application/json", bad_utf8)]), 400),
        ("wrong media type", "text/plain", b"hello", 415),
    ]


def too_large(port):
    """A 10 GiB Content-Length with no body: 413 before any body is sent."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/predict", skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", MULTIPART)
        conn.putheader("Content-Length", str(10 << 30))
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        conn.close()


def bad_client(port, cases, stats, stop):
    i = 0
    while not stop.is_set():
        try:
            if i % (len(cases) + 1) == len(cases):
                what, expected = "10 GiB Content-Length", 413
                status, headers = too_large(port)
            else:
                what, media, body, expected = cases[i % (len(cases) + 1)]
                status, headers, _ = exchange(port, "POST", "/v1/predict", {"Content-Type": media}, body)
            content_type = {k.lower(): v for k, v in headers.items()}.get("content-type")
            if status == expected and content_type == "application/problem+json":
                stats.count("bad")
            else:
                stats.error(f"bad input {what}: {status} ({content_type}), expected {expected}")
        except Exception as e:  # noqa: BLE001
            stats.error(f"bad input: {type(e).__name__}: {e}")
        i += 1
        time.sleep(0.5)


def admin(port, stats, stop):
    n = 0
    while not stop.wait(30):
        route = "/v1/admin/plugins/reload" if n % 2 == 0 else "/v1/admin/model/reload"
        try:
            status, _, data = exchange(port, "POST", route, {}, b"")
            if status == 200:
                stats.count("plugin reload" if n % 2 == 0 else "model reload")
            else:
                stats.error(f"{route}: {status} {data[:200]!r}")
        except Exception as e:  # noqa: BLE001
            stats.error(f"{route}: {type(e).__name__}: {e}")
        n += 1


def rss_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def monitor(pid, stats, stop):
    while not stop.wait(5):
        try:
            rss = rss_of(pid)
        except OSError as e:
            stats.error(f"server gone: {e}")
            return
        with stats.lock:
            stats.rss.setdefault(stats.minute(), []).append(rss)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("oxbox")
    parser.add_argument("minutes", type=float)
    parser.add_argument("--json")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--rss-growth-mib", type=float, default=64)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oxbox-soak-"))
    try:
        model = work / "model"
        subprocess.run([args.oxbox, "model", "init", "--out", str(model), "--backbone", "tiny", "--seed", "7"],
                       check=True, stdout=subprocess.DEVNULL)
        token = work / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        plugin = ROOT / "plugins/dist/example-site/plugin.toml"
        config = work / "oxbox.toml"
        config.write_text(
            f"[site]\nid = \"soak\"\nname = \"soak\"\n[server]\nlisten = \"127.0.0.1:0\"\n"
            f"token_file = \"{token}\"\n[storage]\ndata_dir = \"{work / 'data'}\"\n"
            f"[model]\npackage = \"{model}\"\n[[plugins]]\npath = \"{plugin}\"\n")
        log = open(work / "server.log", "w")
        env = {k: v for k, v in os.environ.items() if k not in ("OXBOX_CONFIG", "RUST_LOG")}
        server = subprocess.Popen([args.oxbox, "--config", str(config), "serve"],
                                  stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        line = server.stdout.readline().strip()
        if not line.startswith("listening on http://"):
            sys.exit(f"soak: the server did not start: {line!r}; log {work / 'server.log'}")
        port = int(line.rsplit(":", 1)[1])
        dicom = (ROOT / "samples/chest-cr-sample.dcm").read_bytes()
        record = (ROOT / "samples/example-site-record.json").read_bytes()
        body = multipart([("dicom", "application/dicom", dicom), ("emr", "application/json", record)])

        stats = Stats()
        stop = threading.Event()
        threads = [threading.Thread(target=good_client, args=(port, body, stats, stop, args.pause)) for _ in range(args.clients)]
        threads.append(threading.Thread(target=bad_client, args=(port, bad_inputs(dicom, record), stats, stop)))
        threads.append(threading.Thread(target=admin, args=(port, stats, stop)))
        threads.append(threading.Thread(target=monitor, args=(server.pid, stats, stop)))
        for t in threads:
            t.start()
        print(f"soak: {args.minutes} min against pid {server.pid} on port {port} (work dir {work})", file=sys.stderr)
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end and server.poll() is None:
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        alive = server.poll() is None
        peak = 0
        if alive:
            with open(f"/proc/{server.pid}/status") as f:
                peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
            server.terminate()
            server.wait(30)
        else:
            stats.error(f"the server exited with {server.returncode}")
    finally:
        if "server" in locals() and server.poll() is None:
            server.kill()

    minutes = sorted(set(stats.latencies) | set(stats.rss))
    minutes = [m for m in minutes if m < args.minutes]
    rows = []
    print(f"{'min':>4} {'good':>6} {'bad':>5} {'reloads':>7} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}")
    for m in minutes:
        lat = stats.latencies.get(m, [])
        c = stats.counts.get(m, {})
        rss = stats.rss.get(m, [0])[-1]
        row = {
            "minute": m + 1, "good": c.get("good", 0), "bad": c.get("bad", 0),
            "reloads": c.get("plugin reload", 0) + c.get("model reload", 0), "errors": c.get("error", 0),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "rss_mib": rss / 2**20,
        }
        rows.append(row)
        print(f"{row['minute']:>4} {row['good']:>6} {row['bad']:>5} {row['reloads']:>7} {row['errors']:>4} "
              f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['rss_mib']:>8.1f}")

    failures = list(stats.errors)
    samples = [(m, r) for m in sorted(stats.rss) for r in stats.rss[m]]
    if samples:
        warm = [r for m, r in samples if m == 0]
        base = warm[-1] if args.minutes >= 3 and warm else samples[0][1]
        last = samples[-1][1]
        growth = (last - base) / 2**20
        print(f"RSS: {base / 2**20:.1f} MiB after warm-up, {last / 2**20:.1f} MiB at the end "
              f"(growth {growth:+.1f} MiB, bound {args.rss_growth_mib:.0f}); peak {peak / 2**20:.1f} MiB")
        if growth > args.rss_growth_mib:
            failures.append(f"RSS grew {growth:.1f} MiB")
    p99s = [r["p99_ms"] for r in rows if r["good"]]
    if len(p99s) >= 2:
        third = max(1, len(p99s) // 3)
        first, last_third = statistics.median(p99s[:third]), statistics.median(p99s[-third:])
        print(f"p99: first third {first:.1f} ms, last third {last_third:.1f} ms (rule: last <= 2 x first + 50 ms)")
        if last_third > 2 * first + 50:
            failures.append(f"p99 rose from {first:.1f} to {last_third:.1f} ms")
    total = {k: sum(stats.counts.get(m, {}).get(k, 0) for m in stats.counts) for k in ("good", "bad", "plugin reload", "model reload", "error")}
    print("totals: " + ", ".join(f"{k} {v}" for k, v in total.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "totals": total, "peak_rss_mib": peak / 2**20, "failures": failures}, indent=1))
    if failures:
        print("soak FAILED:", *failures, sep="\n  ", file=sys.stderr)
        print(f"server log kept: {work / 'server.log'}", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
    print("soak passed")


if __name__ == "__main__":
    main()
