#!/usr/bin/env python3
"""`make bench-fleet`: one server, a store that grows, many hosts at once.

For each store size (chunks of synthetic data, written by `bkp-fleet
prefill` through the store API with the server stopped, every chunk in a
snapshot of host `prefill`) and each host count N:

  1. `bkp-fleet forget` deletes the oldest prefill snapshots holding 1% of
     the prefill chunks (garbage for the GC of this round);
  2. the server starts; N hosts (own tokens, own data: the benchmark tree's
     bytes XORed with a key of their own, so every chunk is new and
     compresses as the tree does) push at once with `bkp push --stdin`,
     while `bkp-server gc` and a scheduled `bkp-server verify` slice run
     and `bkp-fleet probe` times HasChunks queries;
  3. the same N hosts restore their snapshot at once (`--stdout` to
     /dev/null; the client checks every chunk and the stream's hash);
  4. the server stops: its rusage is the round's CPU and peak RSS.

After the last N of a size, once more with the server alone: forget 1%,
run GC, and count the bytes the server process wrote meanwhile
(/proc/PID/io write_bytes: blob and SST rewrites, the GC's own records).

Sizes (env): BENCH_FLEET_CHUNKS (comma-separated chunk counts; default
1x, 10x and 100x BENCH_FLEET_BASE_CHUNKS, the top at least 20 M),
BENCH_FLEET_BASE_CHUNKS (79386: chunk_meta entries after `make bench`'s
four backups), BENCH_FLEET_HOSTS (1,4,16), BENCH_FLEET_HOST_MB (64 MB
pushed per host), BENCH_FLEET_CHUNK_BYTES (64: prefill chunk size; 20 M
chunks take ~4 GB on disk), BENCH_FLEET_DIR (work/fleet under the bench
data; the store stays there between sizes and is deleted at the end,
unless BENCH_FLEET_KEEP=1; BENCH_FLEET_REUSE=1 starts from a kept store,
BENCH_FLEET_GC_ALONE=0 skips the GC-alone pass, BENCH_FLEET_KEY0 the
first XOR key: above the keys the kept store's run used). A quick run:

  BENCH_FLEET_CHUNKS=20000,200000 BENCH_FLEET_HOSTS=1,4 BENCH_FLEET_HOST_MB=16 make bench-fleet
"""

import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

from common import BKP, BKP_SERVER, REPO_ROOT, RESULTS, TARGET, TREE1, WORK, die, disk_bytes, log, output, rmtree, run
from run import machine
from tools import GNU_TIME, free_udp_port

FLEET = TARGET / "release/bkp-fleet"
ENV = os.environ
BASE = int(ENV.get("BENCH_FLEET_BASE_CHUNKS", "79386"))
TOP_MIN = 20_000_000
SIZES = [int(x) for x in ENV.get("BENCH_FLEET_CHUNKS", f"{BASE},{10 * BASE},{max(100 * BASE, TOP_MIN)}").split(",")]
HOSTS = [int(x) for x in ENV.get("BENCH_FLEET_HOSTS", "1,4,16").split(",")]
HOST_MB = int(ENV.get("BENCH_FLEET_HOST_MB", "64"))
CHUNK_BYTES = int(ENV.get("BENCH_FLEET_CHUNK_BYTES", "64"))
FORGET_SHARE = 0.01
DIR = Path(ENV.get("BENCH_FLEET_DIR", WORK / "fleet"))
DATA_DIR = DIR / "data"


def inputs_root():
    shm = Path("/dev/shm")
    need = max(HOSTS) * HOST_MB * 1_000_000 + (2 << 30)
    if shm.is_dir() and shutil.disk_usage(shm).free > need:
        return shm / "bkp-fleet"
    return DIR / "inputs"


INPUTS = inputs_root()


def base_data():
    """HOST_MB MB of the benchmark tree's files, concatenated (made once)."""
    p = DIR / f"base-{HOST_MB}.bin"
    if p.exists():
        return p.read_bytes()
    want = HOST_MB * 1_000_000
    out = bytearray()
    for root, dirs, files in os.walk(TREE1):
        dirs.sort()
        for f in sorted(files):
            fp = Path(root) / f
            if fp.is_file() and not fp.is_symlink():
                out += fp.read_bytes()
            if len(out) >= want:
                break
        if len(out) >= want:
            break
    if len(out) < want:
        die(f"the tree in {TREE1} holds less than {HOST_MB} MB: lower BENCH_FLEET_HOST_MB")
    p.write_bytes(bytes(out[:want]))
    return bytes(out[:want])


def host_input(base, key, path):
    """The base bytes XORed with `key`: every chunk new, same compressibility."""
    table = bytes(b ^ key for b in range(256))
    path.write_bytes(base.translate(table))


class Server:
    def __init__(self):
        self.port = free_udp_port()
        self.proc = None

    def start(self):
        log_path = DIR / "server.log"
        seen = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as f:
            self.proc = subprocess.Popen([BKP_SERVER, "serve", "--data", DATA_DIR, "--listen", f"127.0.0.1:{self.port}"],
                                         stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.time() + 120
        while b"listening on" not in log_path.read_bytes()[seen:]:
            if self.proc.poll() is not None or time.time() > deadline:
                die(f"bkp-server did not start; see {log_path}")
            time.sleep(0.05)

    def cpu(self):
        """User + system seconds so far (/proc/PID/stat, clock ticks)."""
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def written(self):
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 120
        while True:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                self.proc.kill()
            time.sleep(0.05)
        self.proc = None
        return {"cpu": ru.ru_utime + ru.ru_stime, "rss_kb": ru.ru_maxrss}


def token(host):
    path = DIR / "tokens" / host
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        run([BKP_SERVER, "token", "create", "--data", DATA_DIR, "--host", host, "--role", "push"], stdout=f,
            stderr=subprocess.DEVNULL)
    return path


def client_env(server, fingerprint, tok, host):
    cache = DIR / "cache" / host
    return dict(ENV, BKP_SERVER=f"127.0.0.1:{server.port}", BKP_FINGERPRINT=fingerprint, BKP_TOKEN_FILE=str(tok),
                BKP_CACHE_DIR=str(cache), XDG_CACHE_HOME=str(cache))


def timed_popen(argv, env, name, stdin=None, stdout=None):
    """Starts argv under GNU time; returns (Popen, time file, start)."""
    tfile = DIR / "logs" / f"{name}.time"
    tfile.parent.mkdir(parents=True, exist_ok=True)
    fin = open(stdin, "rb") if stdin else subprocess.DEVNULL
    fout = open(stdout, "wb") if stdout else open(DIR / "logs" / f"{name}.out", "wb")
    ferr = open(DIR / "logs" / f"{name}.log", "wb")
    p = subprocess.Popen([GNU_TIME, "-f", "%e %U %S %M", "-o", str(tfile)] + [str(a) for a in argv], env=env,
                         stdin=fin, stdout=fout, stderr=ferr)
    return p, tfile, time.perf_counter(), name


def wait_timed(job):
    p, tfile, t0, name = job
    rc = p.wait()
    end = time.perf_counter()
    if rc != 0:
        die(f"{name} failed (exit {rc}); see {DIR / 'logs' / (name + '.log')}")
    _, user, sys_, rss = tfile.read_text().split("\n")[-2].split()
    return {"wall": end - t0, "end": end, "cpu": float(user) + float(sys_), "rss_kb": int(rss)}


def job_json(proc, name):
    """A job's figures (its --json output is the job record)."""
    out, _ = proc.communicate()
    try:
        return json.loads(out)["figures"]
    except (ValueError, KeyError):
        die(f"bkp-server {name} printed no JSON (exit {proc.returncode}):\n{out[:2000]}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))] if xs else 0.0


def space():
    r = subprocess.run([BKP_SERVER, "status", "--data", DATA_DIR, "--json"], stdout=subprocess.PIPE, text=True)
    try:
        return json.loads(r.stdout)["space"]
    except (ValueError, KeyError):
        return {}


def fleet_tool(*args):
    return json.loads(output([FLEET, *args]).strip().splitlines()[-1])


def one_round(server, fingerprint, base, size_label, n, key):
    f = fleet_tool("forget", "--data", DATA_DIR, "--share", str(FORGET_SHARE))
    hosts = [f"{size_label}-n{n}-h{i}" for i in range(n)]
    toks = {h: token(h) for h in hosts}
    probe_tok = token(f"{size_label}-n{n}-probe")
    rmtree(INPUTS)
    INPUTS.mkdir(parents=True)
    files = {}
    for i, h in enumerate(hosts):
        files[h] = INPUTS / f"{h}.bin"
        host_input(base, key + i, files[h])
    server.start()
    stop_file = DIR / "probe.stop"
    stop_file.unlink(missing_ok=True)
    probe = subprocess.Popen([FLEET, "probe", "--server", f"127.0.0.1:{server.port}", "--fingerprint", fingerprint,
                              "--token-file", probe_tok, "--stop", stop_file], stdout=subprocess.PIPE, text=True)
    time.sleep(1)  # the probe's own upload is not part of the pushes
    cpu0, t0 = server.cpu(), time.perf_counter()
    jobs = {k: subprocess.Popen([BKP_SERVER, k, "--data", DATA_DIR, "--json"], stdout=subprocess.PIPE, text=True)
            for k in ("gc", "verify")}
    pushes = [timed_popen([BKP, "--json", "push", "--name", "data", "--stdin"],
                          client_env(server, fingerprint, toks[h], h), f"{size_label}-n{n}-push-{h}", stdin=files[h])
              for h in hosts]
    pm = [wait_timed(j) for j in pushes]
    push_wall = max(m["end"] for m in pm) - t0
    cpu_push = server.cpu() - cpu0
    stop_file.touch()
    probe_out = json.loads(probe.communicate()[0].strip().splitlines()[-1])
    reports = [json.loads((DIR / "logs" / f"{size_label}-n{n}-push-{h}.out").read_text()) for h in hosts]
    cpu1, t1 = server.cpu(), time.perf_counter()
    restores = [timed_popen([BKP, "restore", "latest", "--name", "data", "--stdout"],
                            client_env(server, fingerprint, toks[h], h), f"{size_label}-n{n}-restore-{h}",
                            stdout="/dev/null") for h in hosts]
    rm = [wait_timed(j) for j in restores]
    restore_wall = max(m["end"] for m in rm) - t1
    cpu_restore = server.cpu() - cpu1
    gc, verify = job_json(jobs["gc"], "gc"), job_json(jobs["verify"], "verify")
    sp = space()
    srv = server.stop()
    rmtree(INPUTS)
    nbytes = len(base)
    scrub = verify.get("scrub") or {}
    vbytes = scrub.get("bytes_checked", 0) + verify.get("bytes_restored", 0)
    gc_rewritten = sum(v for k, v in gc.items() if "rewritten" in k and isinstance(v, (int, float)))
    return {
        "size": size_label, "hosts": n, "forget": f, "bytes_per_host": nbytes,
        "push_wall": push_wall, "push_times": [m["wall"] for m in pm], "restore_wall": restore_wall,
        "restore_times": [m["wall"] for m in rm],
        "aggregate_push_mb_s": n * nbytes / 1e6 / push_wall, "aggregate_restore_mb_s": n * nbytes / 1e6 / restore_wall,
        "push_p50": pct([m["wall"] for m in pm], 0.5), "push_p95": pct([m["wall"] for m in pm], 0.95),
        "push_max": max(m["wall"] for m in pm),
        "server_cpu_push": cpu_push, "server_cpu_restore": cpu_restore,
        "server_cpu_s_per_gb": cpu_push / (n * nbytes / 1e9), "server_cpu_s_per_snapshot": cpu_push / n,
        "client_cpu_push": [m["cpu"] for m in pm],
        "commit_s": [r.get("commit_seconds", 0.0) for r in reports], "bytes_sent": sum(r["bytes_sent"] for r in reports),
        "probe": probe_out, "server": srv,
        "client_rss_kb": max(m["rss_kb"] for m in pm + rm),
        "gc": gc, "gc_bytes_rewritten": gc_rewritten, "verify": verify,
        "verify_mb_s": vbytes / 1e6 / verify["seconds"] if verify.get("seconds") else 0.0,
        "space": sp, "data_dir_bytes": disk_bytes(DATA_DIR),
    }


def gc_alone(server):
    """Forget 1%, then a GC with nothing else running: its time and what
    the server wrote to disk meanwhile."""
    f = fleet_tool("forget", "--data", DATA_DIR, "--share", str(FORGET_SHARE))
    before = space()
    server.start()
    w0 = server.written()
    gc = json.loads(output([BKP_SERVER, "gc", "--data", DATA_DIR, "--json"]))["figures"]
    written = server.written() - w0
    srv = server.stop()
    return {"forget": f, "gc": gc, "written": written, "server": srv, "stored_before": before.get("stored_bytes", 0),
            "disk_before": before.get("store_disk_bytes", 0)}


def rewritten(gc):
    """Bytes the GC report says it rewrote; a local store's report has no
    such figure (the GC-alone table measures what the server wrote)."""
    ks = [k for k in gc if "rewritten" in k]
    return f"{sum(gc[k] for k in ks) / 1e6:.0f} MB" if ks else "n/a"


def label(chunks):
    x = chunks / BASE
    return f"{x:.0f}x" if x >= 1 else f"{x:.2f}x"


def table(meta, sizes):
    lines = [f"## bkp fleet benchmark, {meta['date']}", "", f"- Machine: {meta['machine']}",
             f"- Command: `{meta['command']}` ({meta['minutes']} min); bkp commit {meta['commit']}",
             f"- Store sizes in chunks (1x = {BASE} chunks, `make bench`'s data); prefill chunks of "
             f"{CHUNK_BYTES} B; each host pushes {HOST_MB} MB of its own data (the tree's bytes XORed with a key)",
             "- Each round: forget 1% of the prefill, N hosts push at once while a GC and a verify slice run "
             "(server CPU below includes both), then the N restore at once", "",
             "| store | chunks | hosts | push MB/s (all) | push p50 s | push p95 s | max/median | restore MB/s (all) "
             "| server CPU s/GB | server CPU s/snapshot | has-chunk p50/p95 ms | commit p50/max s | server RSS MB "
             "| client RSS MB | GC s | GC chunks deleted | GC bytes rewritten | verify MB/s | disk B / stored B |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        for r in s["rounds"]:
            sp = r["space"]
            ratio = sp.get("store_disk_bytes", 0) / sp["stored_bytes"] if sp.get("stored_bytes") else 0
            med = statistics.median(r["push_times"])
            lines.append(
                f"| {s['label']} | {sp.get('chunks', s['chunks'])} | {r['hosts']} | {r['aggregate_push_mb_s']:.1f} | "
                f"{r['push_p50']:.1f} | {r['push_p95']:.1f} | {r['push_max'] / med:.2f} | "
                f"{r['aggregate_restore_mb_s']:.1f} | {r['server_cpu_s_per_gb']:.1f} | "
                f"{r['server_cpu_s_per_snapshot']:.2f} | {r['probe']['p50_ms']:.1f} / {r['probe']['p95_ms']:.1f} | "
                f"{statistics.median(r['commit_s']):.2f} / {max(r['commit_s']):.2f} | "
                f"{r['server']['rss_kb'] / 1024:.0f} | {r['client_rss_kb'] / 1024:.0f} | {r['gc'].get('seconds', 0):.1f} | "
                f"{r['gc'].get('chunks_deleted', 0)} | {rewritten(r['gc'])} | {r['verify_mb_s']:.1f} | "
                f"{ratio:.2f} |")
    lines += ["", "GC alone after forgetting 1% of the prefill (no other load; bytes written = the server "
                  "process's write_bytes during the run):", "",
              "| store | prefill s | chunks deleted | GC s | bytes written MB | store stored MB | written / stored |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        g = s.get("gc_alone")
        if not g:
            continue
        st = g["stored_before"] or 1
        lines.append(f"| {s['label']} | {s['prefill']['seconds']:.0f} | {g['gc'].get('chunks_deleted', 0)} | "
                     f"{g['gc'].get('seconds', 0):.1f} | {g['written'] / 1e6:.0f} | {st / 1e6:.0f} | "
                     f"{100 * g['written'] / st:.1f}% |")
    return "\n".join(lines) + "\n"


def main():
    for b in (BKP, BKP_SERVER, FLEET):
        if not b.exists():
            die(f"{b} is missing: run `cargo build --release --workspace --bins` with this CARGO_TARGET_DIR")
    variants = sum(HOSTS) * len(SIZES) + int(ENV.get("BENCH_FLEET_KEY0", "1")) - 1
    if variants > 254:
        die(f"{variants} host inputs: at most 254 distinct XOR keys; fewer sizes or hosts")
    started = datetime.datetime.now()
    fp_file = DIR / "fingerprint"
    if ENV.get("BENCH_FLEET_REUSE") == "1" and fp_file.exists():
        # A store a previous run kept (BENCH_FLEET_KEEP=1): prefill tops it up.
        fingerprint = fp_file.read_text().strip()
    else:
        rmtree(DIR)
        DIR.mkdir(parents=True)
        fingerprint = output([BKP_SERVER, "init", "--data", DATA_DIR]).strip().split("\n")[-1]
        fp_file.write_text(fingerprint + "\n")
    base = base_data()
    server = Server()
    # A reused store already holds the data of the keys its run used.
    sizes, key = [], int(ENV.get("BENCH_FLEET_KEY0", "1"))
    for chunks in SIZES:
        lab = label(chunks)
        log(f"prefill to {chunks} chunks ({lab})")
        pre = fleet_tool("prefill", "--data", DATA_DIR, "--chunks", str(chunks), "--chunk-bytes", str(CHUNK_BYTES))
        log(f"prefill: {pre}")
        s = {"label": lab, "chunks": chunks, "prefill": pre, "rounds": []}
        for n in HOSTS:
            log(f"{lab}: {n} host(s) push and restore, GC and verify alongside")
            r = one_round(server, fingerprint, base, lab, n, key)
            key += n
            log(f"{lab} n={n}: push {r['aggregate_push_mb_s']:.1f} MB/s, restore {r['aggregate_restore_mb_s']:.1f} MB/s,"
                f" server CPU {r['server_cpu_s_per_gb']:.1f} s/GB, GC {r['gc'].get('seconds', 0):.1f} s")
            s["rounds"].append(r)
        if ENV.get("BENCH_FLEET_GC_ALONE", "1") != "0":
            log(f"{lab}: GC alone")
            s["gc_alone"] = gc_alone(server)
        sizes.append(s)
        # What is done so far survives an interrupted run.
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"fleet-{started.strftime('%Y%m%d-%H%M%S')}.partial.json").write_text(json.dumps(sizes) + "\n")
    meta = {"date": started.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "minutes": round((datetime.datetime.now() - started).total_seconds() / 60, 1),
            "command": "make bench-fleet" + "".join(f" {k}={ENV[k]}" for k in sorted(ENV) if k.startswith("BENCH_FLEET_")),
            "commit": output(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"]).strip()}
    out = table(meta, sizes)
    print(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"fleet-{stamp}.json").write_text(json.dumps({"meta": meta, "sizes": sizes}, indent=1) + "\n")
    (RESULTS / f"fleet-{stamp}.md").write_text(out)
    (RESULTS / f"fleet-{stamp}.partial.json").unlink(missing_ok=True)
    log(f"saved {RESULTS}/fleet-{stamp}.json and .md")
    if ENV.get("BENCH_FLEET_KEEP") != "1":
        rmtree(DIR)


if __name__ == "__main__":
    main()
