"""One adapter per backup tool. Each knows how to create a fresh local
repository and the command lines of the four operations the benchmark
times; `measure` runs one of them under GNU time.

Fairness choices (also printed with the results):
  * zstd level 3 everywhere: bkp's default `--level 3`, borg
    `--compression zstd,3`, restic `--compression auto` (its zstd default,
    roughly level 3; restic has no numeric level).
  * Encryption: bkp has none at rest and borg runs with `-e none`; restic
    cannot turn encryption off (AES-256-CTR + Poly1305 on every blob).
  * Every tool gets its own empty cache directory per run, so no tool
    starts with metadata from an earlier run.
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from common import BKP, BKP_SERVER, RUSTIC, die, disk_bytes, output, run

GNU_TIME = "/usr/bin/time"
PASSWORD = "bench"  # restic and rustic require one


def measure(argv, env, log, cwd=None, stdin=None, stdout=None):
    """Runs argv once; returns wall seconds, user/sys CPU seconds and peak
    RSS (KiB) of the client process. stdin/stdout are file paths."""
    tfile = log.with_suffix(".time")
    fin = open(stdin, "rb") if stdin else subprocess.DEVNULL
    fout = open(stdout, "wb") if stdout else log.with_suffix(".out").open("wb")
    with open(log, "wb") as ferr:
        t0 = time.perf_counter()
        p = subprocess.run([GNU_TIME, "-f", "%e %U %S %M", "-o", str(tfile)] + [str(a) for a in argv],
                           env=env, cwd=cwd, stdin=fin, stdout=fout, stderr=ferr)
        wall = time.perf_counter() - t0
    for f in (fin, fout):
        if f is not subprocess.DEVNULL:
            f.close()
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        die(f"`{' '.join(map(str, argv))}` failed (exit {p.returncode}); its stderr ({log}):\n{tail}")
    _, user, sys_, rss = tfile.read_text().split("\n")[-2].split()
    return {"wall": wall, "user": float(user), "sys": float(sys_), "client_rss_kb": int(rss)}


def timed(t, op, label, src=None, target=None, out=None, logname=None):
    """One timed operation of tool `t` (with its server running, if it has
    one): op is backup_tree (src = directory), backup_stdin (src = file),
    restore_tree (into target) or restore_stdin (to file out)."""
    logf = t.dir / f"{logname or op + '-' + label}.log"
    env = t.env()
    # What earlier steps wrote (the rsync'ed working copy: 1.3 GB; the
    # previous tool's repository) is flushed now, or its writeback runs
    # during, and is charged to, whichever tool comes next.
    os.sync()
    t.start()
    try:
        if op == "backup_tree":
            argv, cwd = t.backup_tree(src, label)
            m = measure(argv, env, logf, cwd=cwd)
        elif op == "backup_stdin":
            m = measure(t.backup_stdin(label), env, logf, stdin=src)
        elif op == "restore_tree":
            argv, cwd = t.restore_tree(label, target)
            m = measure(argv, env, logf, cwd=cwd)
        else:
            m = measure(t.restore_stdin(label), env, logf, stdout=out)
    finally:
        m_server = t.stop()
    m.update(m_server)
    if t.name == "bkp" and op.startswith("backup"):
        # bkp --json says how many chunks it had to send.
        try:
            rep = json.loads(logf.with_suffix(".out").read_text())
            m.update({f"bkp_report.{k}": rep[k] for k in ("chunks", "chunks_sent", "bytes_sent")})
        except (ValueError, OSError, KeyError):
            pass
    return m


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tool:
    """Base: `dir` holds the repository, caches, logs and restores."""
    name = "?"

    def __init__(self, base: Path):
        self.dir = base / self.name
        self.dir.mkdir(parents=True)
        self.cache = self.dir / "cache"
        self.cache.mkdir()
        self.repo = self.dir / "repo"

    def env(self):
        return dict(os.environ, XDG_CACHE_HOME=str(self.cache))

    # Long-running parts (bkp's server) start before and stop after each
    # timed step so that their CPU and peak RSS belong to that step.
    def start(self):
        pass

    def stop(self):
        return {}

    def stored_bytes(self):
        return disk_bytes(self.repo)

    def restored_tree(self, target, src):
        """Where a restore into `target` puts the tree backed up from `src`:
        bkp, restic and borg all recreate the absolute path below it."""
        return target / str(src).lstrip("/")


class Bkp(Tool):
    name = "bkp"

    def init(self):
        for b in (BKP, BKP_SERVER):
            if not b.exists():
                die(f"{b} is missing: run `cargo build --release --workspace --bins` with this CARGO_TARGET_DIR")
        out = output([BKP_SERVER, "init", "--data", self.repo])
        self.fingerprint = out.strip().split("\n")[-1]
        self.token = self.dir / "token"
        with open(self.token, "w") as f:
            run([BKP_SERVER, "token", "create", "--data", self.repo, "--host", "bench", "--role", "push"],
                stdout=f, stderr=subprocess.DEVNULL)
        # One port for the whole run: the client's metadata cache belongs
        # to a server, and a restart must look like the same server.
        self.port = free_udp_port()
        self.server = None

    def env(self):
        return dict(super().env(), BKP_SERVER=f"127.0.0.1:{self.port}", BKP_FINGERPRINT=self.fingerprint,
                    BKP_TOKEN_FILE=str(self.token), BKP_CACHE_DIR=str(self.cache / "bkp"))

    def start(self):
        log = self.dir / "server.log"
        # The log is appended to by every step: look only at this start's
        # part, or an earlier "listening on" lets the client start before
        # the server listens (and pay QUIC's 1 s initial retransmit).
        seen = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as f:
            self.server = subprocess.Popen(
                [BKP_SERVER, "serve", "--data", self.repo, "--listen", f"127.0.0.1:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=f)
        for _ in range(600):
            if self.server.poll() is not None:
                die(f"bkp-server exited at start; see {log}")
            if b"listening on" in log.read_bytes()[seen:]:
                return
            time.sleep(0.05)
        die(f"bkp-server did not report 'listening on' within 30 s; see {log}")

    def stop(self):
        """SIGTERM, then the server's own rusage: CPU and peak RSS of the
        whole process life, which is this one step."""
        p = self.server
        p.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        self.server = None
        return {"server_user": ru.ru_utime, "server_sys": ru.ru_stime, "server_rss_kb": ru.ru_maxrss}

    def backup_tree(self, path, label):
        return [BKP, "--json", "push", "--name", "files", path], None

    def backup_stdin(self, label):
        return [BKP, "--json", "push", "--name", "dump", "--stdin"]

    def restore_tree(self, label, target):
        return [BKP, "restore", "latest", "--name", "files", "--target", target], None

    def restore_stdin(self, label):
        return [BKP, "restore", "latest", "--name", "dump", "--stdout"]


class Restic(Tool):
    name = "restic"

    def env(self):
        return dict(super().env(), RESTIC_REPOSITORY=str(self.repo), RESTIC_PASSWORD=PASSWORD,
                    RESTIC_CACHE_DIR=str(self.cache / "restic"))

    def init(self):
        run(["restic", "init", "--repository-version", "2"], env=self.env(), stdout=subprocess.DEVNULL)

    # Parents are found by host and paths, so the second backup of the same
    # path (or of stdin under the same file name) is incremental.
    def backup_tree(self, path, label):
        return ["restic", "backup", "--compression", "auto", "--tag", label, path], None

    def backup_stdin(self, label):
        return ["restic", "backup", "--compression", "auto", "--tag", label, "--stdin",
                "--stdin-filename", "dump.sql"]

    def restore_tree(self, label, target):
        return ["restic", "restore", "latest", "--tag", label, "--target", target], None

    def restore_stdin(self, label):
        return ["restic", "dump", "latest", "--tag", label, "/dump.sql"]


class Borg(Tool):
    name = "borg"

    def env(self):
        return dict(super().env(), BORG_BASE_DIR=str(self.cache / "borg"),
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    def init(self):
        run(["borg", "init", "-e", "none", self.repo], env=self.env())

    def backup_tree(self, path, label):
        return ["borg", "create", "--compression", "zstd,3", f"{self.repo}::{label}", path], None

    def backup_stdin(self, label):
        return ["borg", "create", "--compression", "zstd,3", "--stdin-name", "dump.sql",
                f"{self.repo}::{label}", "-"]

    def restore_tree(self, label, target):
        # borg extracts into the current directory.
        return ["borg", "extract", f"{self.repo}::{label}"], target

    def restore_stdin(self, label):
        return ["borg", "extract", "--stdout", f"{self.repo}::{label}"]


class Rustic(Tool):
    """Optional: only when `cargo install rustic-rs` put a binary in
    ~/.cache/bkp/rustic/bin (scripts/bench/install-rustic.sh)."""
    name = "rustic"

    def env(self):
        return dict(super().env(), RUSTIC_REPOSITORY=str(self.repo), RUSTIC_PASSWORD=PASSWORD,
                    RUSTIC_CACHE_DIR=str(self.cache / "rustic"), RUSTIC_NO_PROGRESS="true")

    def init(self):
        # Level 3 to match the others (rustic's own default is also 3).
        run([RUSTIC, "init", "--set-compression", "3"], env=self.env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def backup_tree(self, path, label):
        return [RUSTIC, "backup", "--tag", label, path], None

    def backup_stdin(self, label):
        # Without --force, rustic 0.11.4 took the second dump for unchanged
        # (same stdin file name as its parent: "1 unchanged, 0 B added")
        # and its snapshot restored the FIRST dump. --force reads it all.
        return [RUSTIC, "backup", "--force", "--tag", label, "--stdin-filename", "dump.sql", "-"]

    def restore_tree(self, label, target):
        return [RUSTIC, "restore", "--filter-tags", label, "latest", target], None

    def restored_tree(self, target, src):
        # rustic restores the backed-up path whole below target
        # (target/root/.../linux-source-6.1).
        return target / str(src).lstrip("/")

    def restore_stdin(self, label):
        return [RUSTIC, "dump", "--filter-tags", label, "latest:dump.sql"]


ALL = {"bkp": Bkp, "restic": Restic, "borg": Borg, "rustic": Rustic}


def available(names):
    """The requested tools that are installed; rustic is skipped with a
    note when absent, the others are required."""
    out = []
    for n in names:
        if n == "rustic" and not RUSTIC.exists():
            print(f"bench: rustic skipped ({RUSTIC} absent; scripts/bench/install-rustic.sh installs it)")
            continue
        if n in ("restic", "borg") and subprocess.run(["sh", "-c", f"command -v {n}"],
                                                      stdout=subprocess.DEVNULL).returncode:
            die(f"{n} is missing: run `scripts/install-deps.sh bench`")
        out.append(ALL[n])
    return out


def version(name):
    cmd = {"bkp": [BKP, "--version"], "restic": ["restic", "version"], "borg": ["borg", "--version"],
           "rustic": [RUSTIC, "--version"]}[name]
    try:
        return output(cmd, stderr=subprocess.DEVNULL).strip().split("\n")[0]
    except Exception:
        return "?"
