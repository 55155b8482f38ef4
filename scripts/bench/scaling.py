#!/usr/bin/env python3
"""`make bench-scaling`: how bkp's times grow (bkp only unless --tools).

  size      push and restore of pgbench dumps at scale 30, 60 and 120
            (1x, 2x, 4x), each into an empty store: time against input
            and snapshot size.
  fullness  the same new data (fresh.sql: scale 30 with every balance
            rewritten, no chunk in common with the rest) pushed into an
            empty store and into one already holding the tree and both
            dumps; then pushed again (every chunk known: the has-chunk
            path only). The full store also restores the tree.

Run `scripts/bench/prepare.py --scaling` first (`make bench-scaling` does).
"""

import argparse
import datetime
import json
import os
import statistics

import tools
from common import RESTORE, DUMP1, apparent_bytes, DUMP2, RESULTS, SCALING, TREE1, WORK, die, log, rmtree, tree_root, warm
from run import check_file, check_tree, machine

SIZES = [("1x", DUMP1), ("2x", SCALING / "dump-x2.sql"), ("4x", SCALING / "dump-x4.sql")]
FRESH = SCALING / "fresh.sql"


def fresh_tool(cls, name):
    base = WORK / "scaling" / name
    rmtree(base)
    t = cls(base)
    t.init()
    return t


def rate(nbytes, m):
    return nbytes / 1e6 / m["wall"]


def size_run(cls):
    rows = []
    for label, dump in SIZES:
        t = fresh_tool(cls, label)
        warm(dump)
        log(f"size {label} {t.name}: push")
        push = tools.timed(t, "backup_stdin", "dump", src=dump)
        RESTORE.mkdir(parents=True, exist_ok=True)
        out = RESTORE / f"{t.name}.sql"
        log(f"size {label} {t.name}: restore")
        restore = tools.timed(t, "restore_stdin", "dump", out=out)
        check_file(dump, out)
        out.unlink()
        rows.append({"input": label, "bytes": dump.stat().st_size, "push": push, "restore": restore,
                     "stored": t.stored_bytes()})
        rmtree(t.dir.parent)
    return rows


def fullness_run(cls):
    rows = []
    for label in ("empty", "full"):
        t = fresh_tool(cls, label)
        if label == "full":
            log(f"fullness {t.name}: filling the store with the tree and both dumps")
            tools.timed(t, "backup_tree", "tree1", src=tree_root(TREE1))
            tools.timed(t, "backup_stdin", "dump1", src=DUMP1)
            tools.timed(t, "backup_stdin", "dump2", src=DUMP2)
        before = t.stored_bytes()
        warm(FRESH)
        log(f"fullness {label} {t.name}: push fresh data, twice")
        push = tools.timed(t, "backup_stdin", "fresh1", src=FRESH)
        repush = tools.timed(t, "backup_stdin", "fresh2", src=FRESH)
        row = {"store": label, "store_bytes_before": before, "push": push, "repush": repush}
        if label == "full":
            target = RESTORE / t.name
            target.mkdir(parents=True)
            warm(t.repo)
            log(f"fullness {t.name}: restore the tree")
            row["restore_tree"] = tools.timed(t, "restore_tree", "tree1", target=target)
            check_tree(tree_root(TREE1), t.restored_tree(target, tree_root(TREE1)))
            rmtree(target)
        rows.append(row)
        rmtree(t.dir.parent)
    return rows


def med(runs, i, sub):
    return {k: statistics.median(r[i][sub][k] for r in runs) for k in runs[0][i][sub]
            if isinstance(runs[0][i][sub][k], (int, float))}


def table(meta, results):
    tree_mb = meta["tree_bytes"] / 1e6
    fresh_mb = FRESH.stat().st_size / 1e6
    lines = [f"## bkp scaling, {meta['date']}", "", f"- Machine: {meta['machine']}",
             f"- Command: `{meta['command']}` ({meta['runs']} run(s), medians)", "",
             "Time against input size (pgbench dumps, each into an empty store):", "",
             "| tool | input | MB | push s | push MB/s | push s per 100 MB | restore s | restore MB/s | stored MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for i, (label, dump) in enumerate(SIZES):
            p, s = med(r["size"], i, "push"), med(r["size"], i, "restore")
            b = r["size"][0][i]["bytes"]
            stored = statistics.median(x[i]["stored"] for x in r["size"])
            lines.append(f"| {name} | {label} | {b / 1e6:.0f} | {p['wall']:.1f} | {rate(b, p):.1f} | "
                         f"{p['wall'] / (b / 1e8):.2f} | {s['wall']:.1f} | {rate(b, s):.1f} | {stored / 1e6:.0f} |")
    lines += ["", f"Time against store fullness (new data: fresh.sql, {fresh_mb:.0f} MB; "
                  f"the full store holds the tree and both dumps):", "",
              "| tool | store | store MB before | push s | push MB/s | repush s | repush MB/s | server CPU s push |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for i in range(2):
            p, q = med(r["fullness"], i, "push"), med(r["fullness"], i, "repush")
            before = statistics.median(x[i]["store_bytes_before"] for x in r["fullness"])
            scpu = p.get("server_user", 0) + p.get("server_sys", 0)
            lines.append(f"| {name} | {r['fullness'][0][i]['store']} | {before / 1e6:.0f} | {p['wall']:.1f} | "
                         f"{rate(fresh_mb * 1e6, p):.1f} | {q['wall']:.1f} | {rate(fresh_mb * 1e6, q):.1f} | "
                         f"{scpu:.1f} |")
    lines += ["", "Restore against snapshot size: the dump rows above, and the tree from the full store:", "",
              "| tool | snapshot | MB | restore s | MB/s |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        m = med(r["fullness"], 1, "restore_tree")
        lines.append(f"| {name} | tree | {tree_mb:.0f} | {m['wall']:.1f} | {rate(tree_mb * 1e6, m):.1f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3")))
    ap.add_argument("--quick", action="store_true", help="one run")
    ap.add_argument("--tools", default=os.environ.get("BENCH_SCALING_TOOLS", "bkp"))
    args = ap.parse_args()
    if not all(p.exists() for _, p in SIZES) or not FRESH.exists():
        die("scaling data missing: run `scripts/bench/prepare.py --scaling` (or `make bench-scaling`)")
    runs = 1 if args.quick else args.runs
    started = datetime.datetime.now()
    results = {}
    for cls in tools.available(args.tools.split(",")):
        results[cls.name] = {"size": [size_run(cls) for _ in range(runs)],
                             "fullness": [fullness_run(cls) for _ in range(runs)]}
    meta = {"date": started.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "runs": runs,
            "command": f"make bench-scaling BENCH_RUNS={runs}",
            "tree_bytes": apparent_bytes(tree_root(TREE1))}
    out = table(meta, results)
    print(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"scaling-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (RESULTS / f"scaling-{stamp}.md").write_text(out)
    log(f"saved {RESULTS}/scaling-{stamp}.json and .md")


if __name__ == "__main__":
    main()
