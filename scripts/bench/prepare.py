#!/usr/bin/env python3
"""Prepares the benchmark data once, under $HOME/.cache/bkp/bench-data:

  tree1/linux-source-*   Debian's linux-source, extracted (~1.3 GB, ~78k files)
  tree2/linux-source-*   a copy with ~1% of files edited, 0.2% deleted, 0.2% added
  dump1.sql              plain pg_dump of a pgbench database, scale 30 (~290 MB)
  dump2.sql              the same database after 8000 pgbench transactions
  scaling/ (--scaling)   dumps at scale 60 and 120, and fresh.sql: scale 30
                         with every balance rewritten (no chunk in common
                         with the other data)

Each item is built under a temporary name and renamed when complete, so an
interrupted run is resumed by running this again. Delete an item to rebuild it.
"""

import argparse
import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from common import (DATA, DUMP1, DUMP2, SCALING, TREE1, TREE2, apparent_bytes, die, file_count, load_manifest,
                    log, rmtree, run, save_manifest, tree_root)

SEED = 5  # the changed tree is the same on every machine
EDIT_FRACTION = 0.01
DELETE_FRACTION = 0.002
ADD_FRACTION = 0.002
PGBENCH_SCALE = 30
PGBENCH_CLIENTS, PGBENCH_TXNS = 4, 2000  # 8000 transactions in all


def need(cmd, pkg):
    if not shutil.which(cmd) and not Path(cmd).exists():
        die(f"{cmd} is missing: run `scripts/install-deps.sh bench` (installs {pkg})")


def extract_tree():
    if TREE1.exists():
        return
    tarballs = sorted(glob.glob("/usr/src/linux-source-*.tar.xz"))
    if not tarballs:
        die("no /usr/src/linux-source-*.tar.xz: run `scripts/install-deps.sh bench`")
    tmp = DATA / "tree1.tmp"
    rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"extracting {tarballs[-1]} (a minute or two)")
    run(["sh", "-c", 'xz -T0 -dc "$1" | tar -x -C "$2"', "-", tarballs[-1], tmp])
    tmp.rename(TREE1)


def edit_middle(path, rng, n):
    """Replaces one line in the middle third of a file and inserts another:
    the kind of edit a patch makes, in a different place in every file."""
    lines = path.read_bytes().split(b"\n")
    lo = len(lines) // 3
    k = rng.randrange(lo, max(lo + 1, 2 * len(lines) // 3))
    new = b"/* bkp bench edit %d: %016x */" % (n, rng.getrandbits(64))
    lines[k:k + 1] = [new, lines[k] if k < len(lines) else b"", b"int bkp_bench_%d;" % n]
    path.write_bytes(b"\n".join(lines))


def change_tree():
    if TREE2.exists():
        return
    tmp = DATA / "tree2.tmp"
    rmtree(tmp)
    log("copying the tree (cp -a) for the changed version")
    run(["cp", "-a", TREE1, tmp])
    root = tree_root(tmp)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    rng = random.Random(SEED)
    n_edit, n_del = round(len(files) * EDIT_FRACTION), round(len(files) * DELETE_FRACTION)
    n_add = round(len(files) * ADD_FRACTION)
    picked = rng.sample(files, n_edit + n_del)
    for i, p in enumerate(picked[:n_edit]):
        edit_middle(p, rng, i)
    for p in picked[n_edit:]:
        p.unlink()
    # New files: lines of an existing file in a new order, in a random
    # existing directory (a new source file looks much like the old ones).
    survivors = [p for p in files if p.exists()]
    for i in range(n_add):
        src = rng.choice(survivors)
        lines = src.read_bytes().split(b"\n")
        rng.shuffle(lines)
        dst = rng.choice(survivors).parent / f"bkp_bench_added_{i:04d}.c"
        dst.write_bytes(b"/* added %d */\n" % i + b"\n".join(lines))
    log(f"changed tree: {n_edit} files edited, {n_del} deleted, {n_add} added (seed {SEED})")
    tmp.rename(TREE2)
    m = load_manifest()
    m["tree_changes"] = {"edited": n_edit, "deleted": n_del, "added": n_add, "seed": SEED}
    save_manifest(m)


class Postgres:
    """A throwaway cluster in /var/tmp (the postgres user cannot enter
    /root), run as `postgres` because PostgreSQL refuses to run as root;
    fsync off since only the dumps matter."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            die("PostgreSQL is not installed: run `scripts/install-deps.sh bench`")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="bkp-bench-pg.", dir="/var/tmp"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_pg:
            run(["chown", "postgres:postgres", self.dir])
        data = self.dir / "data"
        run(self.as_pg + [self.bin / "initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", data],
            stdout=subprocess.DEVNULL)
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off -c full_page_writes=off"
        run(self.as_pg + [self.bin / "pg_ctl", "-D", data, "-l", self.dir / "log", "-o", opts, "-w", "start"],
            stdout=subprocess.DEVNULL)
        self.env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER="postgres")

    def tool(self, name, *args, **kw):
        return run([self.bin / name, *args], env=self.env, **kw)

    def init(self, scale):
        self.tool("dropdb", "--if-exists", "bench")
        self.tool("createdb", "bench")
        log(f"pgbench -i -s {scale}")
        self.tool("pgbench", "-i", "-q", "-s", str(scale), "bench", stderr=subprocess.DEVNULL)

    def dump(self, path):
        tmp = path.with_suffix(".tmp")
        self.tool("pg_dump", "-d", "bench", "-f", tmp)
        tmp.rename(path)
        log(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB")

    def stop(self):
        run(self.as_pg + [self.bin / "pg_ctl", "-D", self.dir / "data", "-m", "fast", "stop"],
            stdout=subprocess.DEVNULL, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_dumps():
    if DUMP1.exists() and DUMP2.exists():
        return
    pg = Postgres()
    try:
        pg.init(PGBENCH_SCALE)
        pg.dump(DUMP1)
        log(f"pgbench: {PGBENCH_CLIENTS} clients x {PGBENCH_TXNS} transactions")
        pg.tool("pgbench", "-n", "-c", str(PGBENCH_CLIENTS), "-j", "2", "-t", str(PGBENCH_TXNS), "bench",
                stdout=subprocess.DEVNULL)
        pg.dump(DUMP2)
    finally:
        pg.stop()


def make_scaling():
    want = [SCALING / "dump-x2.sql", SCALING / "dump-x4.sql", SCALING / "fresh.sql"]
    if all(p.exists() for p in want):
        return
    SCALING.mkdir(parents=True, exist_ok=True)
    pg = Postgres()
    try:
        for scale, path in [(PGBENCH_SCALE * 2, want[0]), (PGBENCH_SCALE * 4, want[1])]:
            if not path.exists():
                pg.init(scale)
                pg.dump(path)
        if not want[2].exists():
            pg.init(PGBENCH_SCALE)
            # Every row changes, so no chunk matches dump1/dump2: "new data"
            # for the empty-store vs full-store comparison.
            pg.tool("psql", "-X", "-q", "-d", "bench", "-c",
                    "update pgbench_accounts set abalance = (aid::bigint * 7919 % 100003)::int - 50000")
            pg.dump(want[2])
    finally:
        pg.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scaling", action="store_true", help="also prepare the larger dumps for bench-scaling")
    args = ap.parse_args()
    for cmd, pkg in [("xz", "xz-utils"), ("rsync", "rsync"), ("runuser", "util-linux")]:
        need(cmd, pkg)
    DATA.mkdir(parents=True, exist_ok=True)
    extract_tree()
    change_tree()
    make_dumps()
    if args.scaling:
        make_scaling()
    m = load_manifest()
    if "sizes" not in m:
        m["sizes"] = {
            "tree1_bytes": apparent_bytes(tree_root(TREE1)), "tree1_files": file_count(tree_root(TREE1)),
            "tree2_bytes": apparent_bytes(tree_root(TREE2)), "tree2_files": file_count(tree_root(TREE2)),
            "dump1_bytes": DUMP1.stat().st_size, "dump2_bytes": DUMP2.stat().st_size,
        }
        save_manifest(m)
    s = m["sizes"]
    log(f"data ready in {DATA}: tree {s['tree1_bytes'] / 1e6:.0f} MB in {s['tree1_files']} files, "
        f"dumps {s['dump1_bytes'] / 1e6:.0f} / {s['dump2_bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
