#!/usr/bin/env python3
"""`make bench-rss`: the client's peak RSS (GNU time's maximum resident set
size) on the inputs that could make it grow, against issue 23's bound of
256 MB whatever the input:

  big file    a 4 GB file (not sparse: the benchmark tree's bytes, XORed
              with a new key every 64 MB, so it compresses like source
              code and no chunk repeats), pushed as a tree and restored
  many files  a tree of 2,000,000 empty files: 1,000 directories of 1,000
              and one directory of 1,000,000 (the lister sorts each
              directory's names), pushed twice (the second push takes
              every file from the metadata cache) and restored

The inputs are generated under BKP_RSS_DIR (default ~/.cache/bkp/rss, on
disk: ~4.1 GB and 2 M inodes; BKP_RSS_BIG_MB=0 leaves the big file out) and deleted afterwards; restores go to
/dev/shm when it has room. Results go to the bench results directory.
"""

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import tools
from common import RESULTS, TREE1, die, log, output, rmtree
from run import machine

DIR = Path(os.environ.get("BKP_RSS_DIR", Path.home() / ".cache/bkp/rss"))
BIG_BYTES = int(os.environ.get("BKP_RSS_BIG_MB", "4096")) * 1_000_000
DIRS, PER_DIR, FLAT = 1000, 1000, 1_000_000
LIMIT_MB = 256
SLICE = 64_000_000


def base_slice():
    out = bytearray()
    for root, dirs, files in os.walk(TREE1):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                out += p.read_bytes()
        if len(out) >= SLICE:
            return bytes(out[:SLICE])
    die(f"{TREE1} holds less than 64 MB")


def make_big(path):
    base = base_slice()
    with open(path, "wb") as f:
        done, key = 0, 1
        while done < BIG_BYTES:
            part = base.translate(bytes(b ^ (key % 255 + 1) for b in range(256)))[:BIG_BYTES - done]
            # Each 64 MB slice also gets its number in front, so slices
            # whose keys repeat (past 255) still differ.
            f.write(key.to_bytes(8, "little") + part[8:])
            done += len(part)
            key += 1


def make_many(root):
    for d in range(DIRS):
        sub = root / f"d{d:04}"
        sub.mkdir(parents=True)
        for i in range(PER_DIR):
            os.close(os.open(sub / f"f{i:04}", os.O_CREAT | os.O_WRONLY, 0o644))
    flat = root / "flat"
    flat.mkdir()
    for i in range(FLAT):
        os.close(os.open(flat / f"file-{i:07}", os.O_CREAT | os.O_WRONLY, 0o644))


def restore_root():
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > BIG_BYTES + (4 << 30):
        return shm / "bkp-rss"
    return DIR / "restore"


def step(t, name, op, label, **kw):
    log(f"{name}")
    m = tools.timed(t, op, label, logname=name.replace(" ", "-"), **kw)
    m["name"] = name
    log(f"{name}: {m['wall']:.1f} s, client peak RSS {m['client_rss_kb'] / 1024:.0f} MB")
    return m


def big_file(t):
    rows = []
    big = DIR / "input-big" / "big.bin"
    big.parent.mkdir()
    log(f"writing a {BIG_BYTES / 1e9:.1f} GB file")
    make_big(big)
    rows.append(step(t, "push 4 GB file", "backup_tree", "big", src=big.parent))
    target = restore_root() / "big"
    rmtree(target)
    target.mkdir(parents=True)
    rows.append(step(t, "restore 4 GB file", "restore_tree", "big", target=target))
    got = t.restored_tree(target, big.parent) / "big.bin"
    if subprocess.run(["cmp", "-s", big, got]).returncode != 0:
        die(f"restored {got} differs from {big}")
    rmtree(target)
    big.unlink()
    return rows


def main():
    started = datetime.datetime.now()
    rmtree(DIR)
    DIR.mkdir(parents=True)
    rows = []
    try:
        t = tools.Bkp(DIR / "run")
        t.init()
        if BIG_BYTES:
            rows += big_file(t)
        many = DIR / "input-many"
        log(f"creating {DIRS * PER_DIR + FLAT} empty files")
        make_many(many)
        t.backup_tree = lambda path, label: ([tools.BKP, "--json", "push", "--name", "many", path], None)
        t.restore_tree = lambda label, target: ([tools.BKP, "restore", "latest", "--name", "many", "--target",
                                                 target], None)
        rows.append(step(t, "push 2 M empty files", "backup_tree", "many", src=many))
        rows.append(step(t, "push 2 M empty files again (cache)", "backup_tree", "many", src=many))
        target = restore_root() / "many"
        rmtree(target)
        target.mkdir(parents=True)
        rows.append(step(t, "restore 2 M empty files", "restore_tree", "many", target=target))
        n = int(output(["sh", "-c", 'find "$1" -type f | wc -l', "-", target]).strip())
        if n != DIRS * PER_DIR + FLAT:
            die(f"restored {n} files, expected {DIRS * PER_DIR + FLAT}")
        rmtree(target)
    finally:
        rmtree(DIR)
    lines = [f"## bkp client peak RSS, {started.strftime('%Y-%m-%d %H:%M')}", "", f"- Machine: {machine()}",
             f"- Command: `make bench-rss`; bkp commit "
             f"{output(['git', '-C', Path(__file__).resolve().parents[2], 'rev-parse', '--short', 'HEAD']).strip()}",
             "", f"| step | wall s | client CPU s | client peak RSS MB | <= {LIMIT_MB} MB | server peak RSS MB |",
             "|---|---:|---:|---:|:-:|---:|"]
    for m in rows:
        rss = m["client_rss_kb"] / 1024
        lines.append(f"| {m['name']} | {m['wall']:.1f} | {m['user'] + m['sys']:.1f} | {rss:.0f} | "
                     f"{'yes' if rss <= LIMIT_MB else '**no**'} | {m.get('server_rss_kb', 0) / 1024:.0f} |")
    out = "\n".join(lines) + "\n"
    print(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"rss-{stamp}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"rss-{stamp}.md").write_text(out)
    log(f"saved {RESULTS}/rss-{stamp}.md")


if __name__ == "__main__":
    main()
