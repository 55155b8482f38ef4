#!/usr/bin/env python3
"""Sync throughput: a bkp push of the benchmark data to one server on
127.0.0.1, then a `bkp-server sync` of it to a second one, both timed;
and, when restic is installed, `restic backup` of the same data into one
repository and `restic copy` into a second. MB/s of the data's logical
size for each.

    scripts/bench/sync.py [--data dump1.sql]

`make bench` runs it (through `measure`, once per data set, after the
comparison runs) and puts the results in its table and JSON; `make
bench-sync` runs it alone. Run `scripts/bench/prepare.py` first; the
binaries are taken from $CARGO_TARGET_DIR/release (default
~/.cache/bkp/target).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path.home() / ".cache/bkp/bench-data"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/bkp/target")) / "release"


def port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def out(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, **kw).stdout


class Server:
    def __init__(self, base, name, toml=""):
        self.dir = base / name
        self.port = port()
        out([TARGET / "bkp-server", "init", "--data", self.dir])
        cert = out(["openssl", "x509", "-in", self.dir / "server.crt", "-outform", "DER"])
        import hashlib
        self.fingerprint = hashlib.sha256(cert).hexdigest()
        if toml:
            (self.dir / "server.toml").write_text(toml)
        log = open(self.dir / "serve.log", "w")
        self.proc = subprocess.Popen([TARGET / "bkp-server", "serve", "--data", self.dir, "--listen",
                                      f"127.0.0.1:{self.port}"], stderr=log)
        for _ in range(200):
            if (self.dir / "control.sock").exists():
                return
            time.sleep(0.05)
        sys.exit(f"{name} did not start; see {self.dir}/serve.log")

    def token(self, host, role):
        t = out([TARGET / "bkp-server", "token", "create", "--data", self.dir, "--host", host, "--role", role])
        p = self.dir / f"{host}.{role}.token"
        p.write_bytes(t)
        return p

    def env(self, token):
        return dict(os.environ, BKP_SERVER=f"127.0.0.1:{self.port}", BKP_FINGERPRINT=self.fingerprint,
                    BKP_TOKEN_FILE=str(token), HOME=str(self.dir))

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def timed(argv, **kw):
    t = time.monotonic()
    r = out(argv, **kw)
    return time.monotonic() - t, r


def measure(src, base_dir=None):
    """Pushes `src` (a file, from stdin, or a directory), syncs it to a
    second server, and (with restic) backs it up and copies it; returns
    {"data", "bytes", "seconds": {step: s}, "mb_s": {step: MB/s},
    "sync_transferred_bytes"}. Steps: bkp_push, bkp_sync, restic_backup,
    restic_copy."""
    src = Path(src)
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) if src.is_dir() else src.stat().st_size
    base = Path(tempfile.mkdtemp(prefix="bkp-sync-bench-", dir=base_dir))
    secs = {}
    res = {"data": src.name, "bytes": size}
    try:
        primary = Server(base, "primary")
        tok = primary.token("bench", "push")
        argv = [TARGET / "bkp", "push", "--json", "--name", "bench"]
        if src.is_dir():
            secs["bkp_push"], _ = timed(argv + [src], env=primary.env(tok))
        else:
            with open(src, "rb") as f:
                secs["bkp_push"], _ = timed(argv + ["--stdin"], env=primary.env(tok), stdin=f)
        sync_tok = primary.token("secondary", "sync")
        toml = (f'[[sync]]\nname = "primary"\nserver = "127.0.0.1:{primary.port}"\n'
                f'fingerprint = "{primary.fingerprint}"\ntoken_file = "{sync_tok}"\n')
        secondary = Server(base, "secondary", toml)
        secs["bkp_sync"], rec = timed([TARGET / "bkp-server", "sync", "--data", secondary.dir, "--remote", "primary",
                                       "--json"])
        res["sync_transferred_bytes"] = json.loads(rec)["figures"]["bytes_transferred"]
        primary.stop()
        secondary.stop()
        shutil.rmtree(primary.dir, ignore_errors=True)
        shutil.rmtree(secondary.dir, ignore_errors=True)
        if shutil.which("restic"):
            env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_FROM_PASSWORD="bench")
            r1, r2 = base / "restic1", base / "restic2"
            out(["restic", "init", "-q", "-r", r1], env=env)
            out(["restic", "init", "-q", "-r", r2, "--from-repo", r1, "--copy-chunker-params"], env=env)
            if src.is_dir():
                secs["restic_backup"], _ = timed(["restic", "backup", "-q", "-r", r1, src], env=env)
            else:
                with open(src, "rb") as f:
                    secs["restic_backup"], _ = timed(["restic", "backup", "-q", "-r", r1, "--stdin"], env=env,
                                                     stdin=f)
            secs["restic_copy"], _ = timed(["restic", "copy", "-q", "-r", r2, "--from-repo", r1], env=env)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res["seconds"] = secs
    res["mb_s"] = {k: size / 1e6 / v for k, v in secs.items()}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA / "dump1.sql"), help="a file pushed from stdin, or a directory")
    a = ap.parse_args()
    r = measure(a.data)
    print(f"data: {a.data} ({r['bytes'] / 1e6:.0f} MB)")
    print("| step | seconds | MB/s |\n|---|---:|---:|")
    for step, secs in r["seconds"].items():
        label = step
        if step == "bkp_sync":
            label += f" ({r['sync_transferred_bytes'] / 1e6:.0f} MB transferred)"
        print(f"| {label} | {secs:.2f} | {r['mb_s'][step]:.0f} |")


if __name__ == "__main__":
    main()
