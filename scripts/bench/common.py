"""Shared paths and helpers of the benchmark harness (stdlib only)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Prepared data lives outside the repository and survives between runs:
# extracting and editing the tree and loading pgbench take minutes.
DATA = Path(os.environ.get("BKP_BENCH_DATA", Path.home() / ".cache/bkp/bench-data"))
TREE1 = DATA / "tree1"          # the extracted linux-source tree (parent dir)
TREE2 = DATA / "tree2"          # the same tree, ~1% edited, some deleted/added
DUMP1 = DATA / "dump1.sql"      # pg_dump of pgbench scale 30 after -i
DUMP2 = DATA / "dump2.sql"      # the same database after a pgbench run
SCALING = DATA / "scaling"      # larger dumps and fresh data for bench-scaling
WORK = DATA / "work"            # per-run repositories, working copy, restores
RESULTS = DATA / "results"


def _restore_root():
    # Restores go to tmpfs when it has room: after the harness has deleted
    # a few 78,000-file trees, ext4's inode allocator (recently_deleted,
    # find_inode_bit) took 50 s of kernel time to create the next 78,000
    # files, for every tool alike, so on disk the step measured the file
    # system's history rather than the tool.
    forced = os.environ.get("BKP_BENCH_RESTORE")
    if forced:
        return Path(forced)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 6 << 30:
        return shm / "bkp-bench"
    return WORK / "restore"


RESTORE = _restore_root()       # restore targets (one tool at a time)
MANIFEST = DATA / "prepared.json"

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/bkp/target"))
BKP = TARGET / "release/bkp"
BKP_SERVER = TARGET / "release/bkp-server"
RUSTIC = Path.home() / ".cache/bkp/rustic/bin/rustic"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    print(f"bench: {msg}", file=sys.stderr)
    sys.exit(1)


def run(argv, **kw):
    """Runs a command that must succeed; its stderr goes to ours."""
    kw.setdefault("check", True)
    return subprocess.run([str(a) for a in argv], **kw)


def output(argv, **kw):
    return run(argv, stdout=subprocess.PIPE, text=True, **kw).stdout


def tree_root(parent):
    """The single top-level directory inside TREE1/TREE2 (linux-source-X.Y)."""
    dirs = [p for p in parent.iterdir() if p.is_dir()]
    if len(dirs) != 1:
        die(f"{parent} should hold exactly one directory; delete it and run `make bench` again")
    return dirs[0]


def apparent_bytes(path):
    """Bytes of file content (what a backup reads), as `du --apparent-size`."""
    if path.is_file():
        return path.stat().st_size
    return int(output(["du", "-sb", "--apparent-size", path]).split()[0])


def disk_bytes(path):
    """Bytes a repository occupies on disk (`du`, allocated blocks)."""
    return int(output(["du", "-sB1", path]).split()[0])


def file_count(path):
    return int(output(["sh", "-c", 'find "$1" -type f | wc -l', "-", path]).strip())


def rmtree(path):
    if path.exists():
        shutil.rmtree(path)


def load_manifest():
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def save_manifest(m):
    tmp = MANIFEST.with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    tmp.replace(MANIFEST)


def warm(path):
    """Reads every file once so that all tools start from the page cache
    (dropping caches is not possible here, and would hit the first tool
    harder than the rest)."""
    if path.is_file():
        run(["sh", "-c", 'cat "$1" > /dev/null', "-", path])
    else:
        run(["sh", "-c", 'find "$1" -type f -print0 | xargs -0 cat > /dev/null', "-", path])
