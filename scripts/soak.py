#!/usr/bin/env python3
"""Soak test: MINUTES of mixed traffic against a real `oxbox serve` on
loopback, with federation rounds running beside it, per-minute latency and
memory figures and pass/fail rules.

Traffic (Python standard library only):
  * GOOD clients (default 3) POST the sample case (samples/) to /v1/predict
    in a loop, pausing PAUSE_S between requests: every answer must be 200;
  * one client sends bad input in turn (a truncated DICOM -> 422, a broken
    multipart -> 400, deeply nested EMR JSON -> 400, invalid UTF-8 -> 400,
    a wrong media type -> 415, a 10 GiB Content-Length -> 413), each
    answered with its own status and application/problem+json;
  * every minute a plugin reload (POST /v1/admin/plugins/reload) and, half a
    minute later, a model reload (POST /v1/admin/model/reload): both 200.
    A model reload answered 429 (Retry-After) or 409 because a federation
    promotion had just reloaded the model (`server.reload_min_interval_s`,
    one reload at a time) is retried once after Retry-After and counted as
    deferred; the retry must get 200.

Federation (unless --no-federation): an `oxbox aggregator serve` on
loopback runs one job from the served model (the tiny backbone), with a
statistics round and ROUNDS training rounds; the served site runs
`oxbox federate --exit-when-finished` with the server's own config file
(`[federation]`: a synthetic site folder of 60 cases from `oxbox synth`,
`promote = true` with the gate open (`promote_max_auc_drop = 1`: the soak
tests the swap, not the learning), `serve_url` = the server). Two sites are
enrolled and the second stays offline, so each round closes by
`min_sites = 1` once `max_wait_s` = ROUND_EVERY has passed: a round every
ROUND_EVERY seconds (default 150 s for runs of 10 minutes or more, else a
quarter of the run, at least 15 s), ROUNDS = the run's length in periods
minus 2 (at least 1). Each global model (round >= 1) is evaluated by the
site, promoted into the served model's promotion layout and swapped in by
the site's reload request (when that one is answered 429/409 because the
soak's own model reload had just run, `oxbox federate` asks again after
Retry-After) while traffic flows. Every 5 s the served model's federation round is read from
GET /v1/model.

Every 5 s the server's resident size (VmRSS) is sampled from /proc; the
peak RSS of the aggregator and of `oxbox federate` is their ru_maxrss
(wait4) when they exit.

Rules (exit 1 if any fails):
  * no unexpected status, connection error or malformed answer;
  * RSS growth: the last minute's RSS exceeds the RSS at the end of the
    warm-up (minute 1; for runs under 3 minutes the first sample) by at
    most RSS_GROWTH_MIB (default 64 MiB);
  * p99 stable: for runs of 3 minutes or more, the median of the per-minute
    p99 over the last third of the run is at most 2x that of the first
    third plus 50 ms (a shared machine's noise is allowed; a trend that
    doubles is not). Shorter runs check the rule over minutes 1 and last;
  * federation: `oxbox federate` exits 0 with the job finished at round
    ROUNDS before the run ends (or within a grace of max(60 s, ROUND_EVERY)
    after it, traffic stopped), every round trained and uploaded once, no
    update refused, no retry, every global model promoted, no warning or
    error in its log or the aggregator's other than a reload deferred
    (429/409); the aggregator's status says finished at round ROUNDS; and
    the server ends up serving the job's final global model (GET /v1/model
    `federation.round` = ROUNDS).

Usage: scripts/soak.py OXBOX_BINARY MINUTES [--json OUT] [--round-every S]
       [--no-federation]
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
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
SITE_CASES = 60
JOB = "soak"


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
        self.served_round = {}  # minute -> federation round served (last sample)
        self.rounds_seen = {}  # federation round -> seconds when first seen served

    def elapsed(self):
        return time.monotonic() - self.started

    def minute(self):
        return int(self.elapsed() // 60)

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
                self.errors.append(f"[{self.elapsed():7.1f}s] {text}")
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


def model_reload(port, stats, stop=None, retry=True):
    """POST /v1/admin/model/reload; a 429/409 (a federation promotion has
    just reloaded) is retried once after Retry-After. True when 200."""
    route = "/v1/admin/model/reload"
    status, headers, data = exchange(port, "POST", route, {}, b"")
    if status in (409, 429) and retry:
        headers = {k.lower(): v for k, v in headers.items()}
        wait = min(30.0, float(headers.get("retry-after", "1")))
        stats.count("model reload deferred")
        if stop is not None and stop.wait(wait + 0.2):
            return True
        if stop is None:
            time.sleep(wait + 0.2)
        status, headers, data = exchange(port, "POST", route, {}, b"")
    if status == 200:
        stats.count("model reload")
        return True
    stats.error(f"{route}: {status} {data[:200]!r}")
    return False


def admin(port, stats, stop):
    n = 0
    while not stop.wait(30):
        try:
            if n % 2 == 0:
                route = "/v1/admin/plugins/reload"
                status, _, data = exchange(port, "POST", route, {}, b"")
                if status == 200:
                    stats.count("plugin reload")
                else:
                    stats.error(f"{route}: {status} {data[:200]!r}")
            else:
                model_reload(port, stats, stop)
        except Exception as e:  # noqa: BLE001
            stats.error(f"admin reload: {type(e).__name__}: {e}")
        n += 1


def rss_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def served_model(port):
    """GET /v1/model: (digest, federation round or None)."""
    status, _, data = exchange(port, "GET", "/v1/model", {}, b"", timeout=30)
    if status != 200:
        raise RuntimeError(f"GET /v1/model: {status} {data[:200]!r}")
    answer = json.loads(data)
    federation = answer.get("federation") or {}
    return answer["model"]["digest"], federation.get("round")


def monitor(pid, port, stats, stop, federation):
    while not stop.wait(5):
        try:
            rss = rss_of(pid)
        except OSError as e:
            stats.error(f"server gone: {e}")
            return
        with stats.lock:
            stats.rss.setdefault(stats.minute(), []).append(rss)
        if federation:
            try:
                _, served = served_model(port)
                with stats.lock:
                    stats.served_round[stats.minute()] = served
                    if served is not None:
                        stats.rounds_seen.setdefault(served, round(stats.elapsed(), 1))
            except Exception as e:  # noqa: BLE001
                stats.error(f"GET /v1/model: {type(e).__name__}: {e}")


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(proc, what, log):
    """The port of the 'listening on http://127.0.0.1:PORT' line."""
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on http://"):
        sys.exit(f"soak: {what} did not start: {line!r}; log {log}")
    return int(line.rsplit(":", 1)[1])


def reap(proc, timeout):
    """Waits for `proc` (wait4): (exit code, peak RSS in bytes), or None
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def run_json(args):
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


class Federation:
    """An aggregator on loopback and the served site's `oxbox federate`."""

    def __init__(self, oxbox, work, minutes, round_every):
        self.oxbox = oxbox
        self.work = work
        if round_every is None:
            round_every = 150 if minutes >= 10 else max(15, int(minutes * 60 / 4))
        self.period = int(round_every)
        self.rounds = max(1, int(minutes * 60 // self.period) - 2)
        self.lock = threading.Lock()
        self.events = []  # (seconds into the run, what)
        self.round_started = {}  # round -> seconds
        self.round_done = {}  # round -> seconds (update complete)
        self.promoted = {}  # round -> seconds
        self.deferred = 0  # the site's reload answered 429/409
        self.findings = []
        self.aggregator = self.site = None
        self.reader = None
        self.result = None

    def prepare(self):
        """Keys, the site folder, the job's start model (the served model's
        copy) and the aggregator, started; its URL and public key."""
        w = self.work
        aggregator = run_json([self.oxbox, "keys", "generate", "--out", str(w / "aggregator-key")])
        self.site_key = run_json([self.oxbox, "keys", "generate", "--out", str(w / "site-key")])
        offline = run_json([self.oxbox, "keys", "generate", "--out", str(w / "offline-key")])
        self.aggregator_public = aggregator["public_key"]
        started = time.monotonic()
        subprocess.run([self.oxbox, "synth", "--sites", "1", "--cases-per-site", str(SITE_CASES), "--seed", "5",
                        "--out", str(w / "cohort")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.synth_s = time.monotonic() - started
        self.site_dir = w / "cohort/site-1"
        # The site folder carries the plugin its site.toml names.
        shutil.copytree(ROOT / "plugins/dist/canonical", self.site_dir / "plugins/canonical")
        shutil.copytree(w / "model", w / "start")
        config = w / "aggregator.toml"
        config.write_text(
            f"[aggregator]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{w / 'aggregator'}\"\n"
            f"key_file = \"{aggregator['private_key']}\"\n"
            f"[job]\nid = \"{JOB}\"\nstart_model = \"{w / 'start'}\"\nrounds = {self.rounds}\n"
            f"min_sites = 1\nmax_wait_s = {self.period}\nstatistics = true\n"
            f"[job.training]\nepochs = 1\nbatch_size = 8\nlearning_rate = 0.001\nproximal_mu = 0.0\n"
            f"[[sites]]\nid = \"soak\"\npublic_key = \"{self.site_key['public_key']}\"\n"
            f"[[sites]]\nid = \"offline\"\npublic_key = \"{offline['public_key']}\"\n")
        self.aggregator_log = w / "aggregator.log"
        self.aggregator = subprocess.Popen([self.oxbox, "aggregator", "serve", "--config", str(config)],
                                           stdout=subprocess.PIPE, stderr=open(self.aggregator_log, "w"),
                                           env=clean_env(), text=True)
        self.port = listening(self.aggregator, "the aggregator", self.aggregator_log)

    def config_section(self, serve_port):
        return (f"[federation]\naggregator_url = \"http://127.0.0.1:{self.port}\"\n"
                f"aggregator_key = \"{self.aggregator_public}\"\nkey_file = \"{self.site_key['private_key']}\"\n"
                f"data = [\"{self.site_dir}\"]\nholdout = 0.3\npoll_interval_ms = 500\n"
                f"promote = true\npromote_max_auc_drop = 1.0\nserve_url = \"http://127.0.0.1:{serve_port}\"\n")

    def start(self, config, stats):
        self.stats = stats
        self.site_log = self.work / "federate.log"
        self.site = subprocess.Popen([self.oxbox, "--config", str(config), "federate", "--exit-when-finished"],
                                     stdout=open(self.work / "federate.json", "w"), stderr=subprocess.PIPE,
                                     env=clean_env(), text=True)
        self.reader = threading.Thread(target=self.read_log)
        self.reader.start()

    def note(self, what):
        with self.lock:
            self.events.append((self.stats.elapsed(), what))

    def finding(self, text):
        with self.lock:
            self.findings.append(text)
        self.stats.error(f"federation: {text}")

    def read_log(self):
        with open(self.site_log, "w") as log:
            for line in self.site.stderr:
                log.write(line)
                log.flush()
                line = line.strip()
                t = self.stats.elapsed()
                if m := re.search(r"federate: job \S+: round (\d+) of", line):
                    self.round_started.setdefault(int(m.group(1)), t)
                elif m := re.search(r"federate: round (\d+): update complete", line):
                    self.round_done[int(m.group(1))] = t
                    self.stats.count("round")
                    self.note(f"round {m.group(1)} uploaded")
                elif m := re.search(r"global model of round (\d+): held-out AUC (\S+) \(served (\S+)\)(, promoted)?", line):
                    if m.group(4):
                        self.promoted[int(m.group(1))] = t
                        self.note(f"round {m.group(1)} promoted (AUC {m.group(2)})")
                    else:
                        self.finding(f"the global model of round {m.group(1)} was not promoted: {line}")
                elif "federate: statistics sent" in line or "federate: the job is finished" in line:
                    self.note(line.removeprefix("federate: "))
                elif "serve deferred the reload; asking again" in line:
                    # oxbox federate asks again after Retry-After.
                    self.deferred += 1
                    self.note("the site's reload deferred (429/409); federate asks again")
                elif re.search(r"the promoted model is in place, but serve answered 4(29|09)", line):
                    # A binary from before federate retried deferred reloads.
                    self.deferred += 1
                    self.note("the site's reload deferred (429/409)")
                elif (" WARN " in line or " ERROR " in line or "refused the update" in line
                      or re.search(r"failed \(.*\); attempt \d+", line)):
                    self.finding(line[:300])

    def finish(self, grace):
        """Waits for `oxbox federate` (at most `grace` s), stops the
        aggregator; the findings and figures."""
        site = reap(self.site, grace) if self.site else None
        if site is None:
            self.finding(f"oxbox federate had not finished {grace:.0f} s after the traffic stopped")
            self.site.kill()
            site = reap(self.site, 30) or (None, 0)
        if self.reader:
            self.reader.join(10)
        code, site_peak = site
        summary = {}
        try:
            summary = json.loads((self.work / "federate.json").read_text() or "{}")
        except ValueError as e:
            self.finding(f"the site's summary is not JSON: {e}")
        if code != 0:
            self.finding(f"oxbox federate exited with {code}; log {self.site_log}")
        counters = summary.get("counters", {})
        expected = {"rounds_trained": self.rounds, "updates_uploaded": self.rounds,
                    "promotions": self.rounds, "updates_refused": 0, "retries": 0}
        if code == 0:
            if summary.get("final_round") != self.rounds:
                self.finding(f"the job finished at round {summary.get('final_round')}, not {self.rounds}")
            for key, want in expected.items():
                if counters.get(key) != want:
                    self.finding(f"the site's counter {key} is {counters.get(key)}, expected {want}")
        status = {}
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", "/v1/status")
            status = json.loads(conn.getresponse().read())
            conn.close()
            if status.get("phase") != "finished":
                self.finding(f"the aggregator's phase is {status.get('phase')!r}, not finished")
        except Exception as e:  # noqa: BLE001
            self.finding(f"the aggregator's status: {type(e).__name__}: {e}")
        aggregator_peak = 0
        if self.aggregator and self.aggregator.poll() is None:
            self.aggregator.terminate()
            code_peak = reap(self.aggregator, 30)
            if code_peak is None:
                self.aggregator.kill()
                code_peak = reap(self.aggregator, 30) or (None, 0)
            aggregator_peak = code_peak[1]
        else:
            self.finding(f"the aggregator exited early ({self.aggregator.returncode}); log {self.aggregator_log}")
        for line in self.aggregator_log.read_text(errors="replace").splitlines():
            if " WARN " in line or " ERROR " in line:
                self.finding(f"aggregator: {line[:300]}")
        durations = [self.round_done[r] - self.round_started[r] for r in self.round_done if r in self.round_started]
        self.result = {
            "rounds": self.rounds, "round_every_s": self.period, "site_cases": SITE_CASES,
            "synth_s": round(self.synth_s, 1),
            "rounds_uploaded": len(self.round_done), "promotions": len(self.promoted),
            "site_reloads_deferred": self.deferred,
            "round_train_upload_s": [round(d, 1) for d in durations],
            "final_round": summary.get("final_round"), "final_model": summary.get("final_model"),
            "counters": counters,
            "bytes_sent": counters.get("bytes_sent"),
            "federate_peak_rss_mib": site_peak / 2**20, "aggregator_peak_rss_mib": aggregator_peak / 2**20,
            "aggregator_status": {k: status.get(k) for k in ("phase", "round")},
            "events": [(round(t, 1), w) for t, w in self.events],
        }
        return self.result

    def kill(self):
        for proc in (self.site, self.aggregator):
            if proc and proc.returncode is None and proc.poll() is None:
                proc.kill()


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("OXBOX_CONFIG", "RUST_LOG")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("oxbox")
    parser.add_argument("minutes", type=float)
    parser.add_argument("--json")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--rss-growth-mib", type=float, default=64)
    parser.add_argument("--round-every", type=float, help="seconds between federation rounds (max_wait_s)")
    parser.add_argument("--no-federation", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oxbox-soak-"))
    federation = None if args.no_federation else Federation(args.oxbox, work, args.minutes, args.round_every)
    fed = None
    wall_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_start = os.getloadavg()
    try:
        model = work / "model"
        subprocess.run([args.oxbox, "model", "init", "--out", str(model), "--backbone", "tiny", "--seed", "7"],
                       check=True, stdout=subprocess.DEVNULL)
        if federation:
            federation.prepare()
        token = work / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        plugin = ROOT / "plugins/dist/example-site/plugin.toml"
        config = work / "oxbox.toml"
        log = open(work / "server.log", "w")
        for _attempt in range(3):
            # A fixed port, so that the same file tells `oxbox federate`
            # where to send its reload (serve_url).
            port = free_port()
            config.write_text(
                f"[site]\nid = \"soak\"\nname = \"soak\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n"
                f"token_file = \"{token}\"\n[storage]\ndata_dir = \"{work / 'data'}\"\n"
                f"[model]\npackage = \"{model}\"\n[[plugins]]\npath = \"{plugin}\"\n"
                + (federation.config_section(port) if federation else ""))
            server = subprocess.Popen([args.oxbox, "--config", str(config), "serve"],
                                      stdout=subprocess.PIPE, stderr=log, env=clean_env(), text=True)
            line = server.stdout.readline().strip()
            if line.startswith("listening on http://"):
                break
            server.wait(30)
        else:
            sys.exit(f"soak: the server did not start: {line!r}; log {work / 'server.log'}")
        dicom = (ROOT / "samples/chest-cr-sample.dcm").read_bytes()
        record = (ROOT / "samples/example-site-record.json").read_bytes()
        body = multipart([("dicom", "application/dicom", dicom), ("emr", "application/json", record)])

        stats = Stats()
        stop = threading.Event()
        threads = [threading.Thread(target=good_client, args=(port, body, stats, stop, args.pause)) for _ in range(args.clients)]
        threads.append(threading.Thread(target=bad_client, args=(port, bad_inputs(dicom, record), stats, stop)))
        threads.append(threading.Thread(target=admin, args=(port, stats, stop)))
        threads.append(threading.Thread(target=monitor, args=(server.pid, port, stats, stop, federation is not None)))
        for t in threads:
            t.start()
        if federation:
            federation.start(config, stats)
            print(f"soak: federation: aggregator on port {federation.port}, {federation.rounds} round(s), "
                  f"one every {federation.period} s, a site of {SITE_CASES} cases "
                  f"(synth {federation.synth_s:.1f} s)", file=sys.stderr)
        print(f"soak: {args.minutes} min against pid {server.pid} on port {port} (work dir {work})", file=sys.stderr)
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end and server.poll() is None:
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        if federation:
            fed = federation.finish(grace=max(60, federation.period))
            # The server serves the job's final model: after the site's
            # own reload, or the soak's minute reload; one more reload when
            # the last promotion's notice was deferred after the last one.
            try:
                digest, served = served_model(port)
                if served != federation.rounds and fed["final_round"] == federation.rounds:
                    model_reload(port, stats)
                    digest, served = served_model(port)
                    fed["final_reload_by_soak"] = True
                fed["served_round_at_end"] = served
                fed["rounds_seen_served"] = dict(sorted(stats.rounds_seen.items()))
                fed["served_digest_at_end"] = digest
                if served != federation.rounds or digest != fed["final_model"]:
                    stats.error(f"federation: the server serves round {served} ({digest}), not the final "
                                f"round {federation.rounds} ({fed['final_model']})")
            except Exception as e:  # noqa: BLE001
                stats.error(f"federation: GET /v1/model at the end: {type(e).__name__}: {e}")
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
        if federation:
            federation.kill()
        if "server" in locals() and server.poll() is None:
            server.kill()
    wall_end = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_end = os.getloadavg()

    minutes = sorted(set(stats.latencies) | set(stats.rss))
    minutes = [m for m in minutes if m < args.minutes]
    rows = []
    print(f"{'min':>4} {'good':>6} {'bad':>5} {'reloads':>7} {'rounds':>6} {'served':>6} {'err':>4} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}")
    for m in minutes:
        lat = stats.latencies.get(m, [])
        c = stats.counts.get(m, {})
        rss = stats.rss.get(m, [0])[-1]
        served = stats.served_round.get(m)
        row = {
            "minute": m + 1, "good": c.get("good", 0), "bad": c.get("bad", 0),
            "reloads": c.get("plugin reload", 0) + c.get("model reload", 0), "rounds": c.get("round", 0),
            "served_round": served, "errors": c.get("error", 0),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "rss_mib": rss / 2**20,
        }
        rows.append(row)
        print(f"{row['minute']:>4} {row['good']:>6} {row['bad']:>5} {row['reloads']:>7} {row['rounds']:>6} "
              f"{'-' if served is None else served:>6} {row['errors']:>4} "
              f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['rss_mib']:>8.1f}")

    failures = list(stats.errors)
    summary = {}
    samples = [(m, r) for m in sorted(stats.rss) for r in stats.rss[m]]
    if samples:
        warm = [r for m, r in samples if m == 0]
        base = warm[-1] if args.minutes >= 3 and warm else samples[0][1]
        last = samples[-1][1]
        growth = (last - base) / 2**20
        summary["rss_mib"] = {"start": samples[0][1] / 2**20, "after_warm_up": base / 2**20,
                              "end": last / 2**20, "peak_sampled": max(r for _, r in samples) / 2**20,
                              "peak_vmhwm": peak / 2**20, "growth": growth, "bound": args.rss_growth_mib}
        print(f"RSS: {samples[0][1] / 2**20:.1f} MiB at the first sample, {base / 2**20:.1f} MiB after warm-up, "
              f"{last / 2**20:.1f} MiB at the end (growth {growth:+.1f} MiB, bound {args.rss_growth_mib:.0f}); "
              f"peak {peak / 2**20:.1f} MiB")
        if growth > args.rss_growth_mib:
            failures.append(f"RSS grew {growth:.1f} MiB")
    p99s = [r["p99_ms"] for r in rows if r["good"]]
    if len(p99s) >= 2:
        third = max(1, len(p99s) // 3)
        first, last_third = statistics.median(p99s[:third]), statistics.median(p99s[-third:])
        p50s = [r["p50_ms"] for r in rows if r["good"]]
        summary["thirds"] = {
            "minutes_per_third": third,
            "p50_median_ms": [statistics.median(p50s[:third]), statistics.median(p50s[third:-third] or p50s), statistics.median(p50s[-third:])],
            "p99_median_ms": [first, statistics.median(p99s[third:-third] or p99s), last_third],
        }
        print(f"p99: first third {first:.1f} ms, last third {last_third:.1f} ms (rule: last <= 2 x first + 50 ms)")
        if last_third > 2 * first + 50:
            failures.append(f"p99 rose from {first:.1f} to {last_third:.1f} ms")
    kinds = ("good", "bad", "plugin reload", "model reload", "model reload deferred", "round", "error")
    total = {k: sum(stats.counts.get(m, {}).get(k, 0) for m in stats.counts) for k in kinds}
    print("totals: " + ", ".join(f"{k} {v}" for k, v in total.items()))
    if fed:
        d = fed["round_train_upload_s"]
        print(f"federation: {fed['rounds_uploaded']} of {fed['rounds']} round(s) trained and uploaded, "
              f"{fed['promotions']} promoted, one every {fed['round_every_s']} s; train + upload per round "
              f"{min(d) if d else 0:.1f}-{max(d) if d else 0:.1f} s; the site's reload deferred "
              f"{fed['site_reloads_deferred']}x; rounds seen served (GET /v1/model every 5 s) "
              f"{sorted(fed.get('rounds_seen_served', {}))}, at the end round {fed.get('served_round_at_end')}; "
              f"peak RSS federate {fed['federate_peak_rss_mib']:.1f} MiB, aggregator "
              f"{fed['aggregator_peak_rss_mib']:.1f} MiB; {fed['bytes_sent'] or 0} bytes sent")
    print(f"window: {wall_start} - {wall_end}; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "minutes": args.minutes, "binary": args.oxbox, "window": [wall_start, wall_end],
            "loadavg": [load_start, load_end], "rows": rows, "totals": total, "summary": summary,
            "peak_rss_mib": peak / 2**20, "federation": fed, "failures": failures}, indent=1))
    if failures:
        print("soak FAILED:", *failures, sep="\n  ", file=sys.stderr)
        print(f"logs kept in {work} (server.log, federate.log, aggregator.log)", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
    print("soak passed")


if __name__ == "__main__":
    main()
