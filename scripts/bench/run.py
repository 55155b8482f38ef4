#!/usr/bin/env python3
"""The comparison run of `make bench`: bkp (client and server on
127.0.0.1), restic and borg (and rustic when installed), each step run by
every tool in turn before the next step starts, several runs, medians.

Steps, in order, on fresh repositories every run:
  tree_first    back up the tree (a working copy of tree1)
  tree_incr     the working copy is rsync'ed to tree2 (only changed files
                are rewritten, the rest keep inode and ctime, as on a real
                host), then backed up again
  dump_first    dump1.sql from stdin
  dump_changed  dump2.sql from stdin, same set
  restore_tree  the changed tree, compared byte for byte with tree2
  restore_dump  dump2, compared byte for byte with dump2.sql

Then, once (not per run, to keep the bench short), the sync measurement
of `sync.py` on dump1 and tree1: a bkp push to one server, `bkp-server
sync` to a second, `restic backup` and `restic copy` of the same data
(BENCH_SYNC=0 leaves it out).

Run `scripts/bench/prepare.py` first (`make bench` does).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import floor
import tools
from common import (DUMP1, DUMP2, REPO_ROOT, RESTORE, RESULTS, TREE1, TREE2, WORK, die, load_manifest, log, output,
                    rmtree, run, tree_root, warm)
from report import markdown, sync_markdown

STEPS = ["tree_first", "tree_incr", "dump_first", "dump_changed", "restore_tree", "restore_dump"]


def sync_tree(src_parent, dst):
    """Makes the working copy equal to src; rsync rewrites only files whose
    size or mtime differ, so unchanged files stay the same inodes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    run(["rsync", "-a", "--delete", f"{tree_root(src_parent)}/", f"{dst}/"])


def check_tree(ref, got):
    r = subprocess.run(["diff", "-rq", "--no-dereference", ref, got], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        die(f"restored tree {got} differs from {ref}:\n{r.stdout[:2000]}")


def check_file(ref, got):
    if subprocess.run(["cmp", "-s", ref, got]).returncode != 0:
        die(f"restored stream {got} differs from {ref}")


def one_run(i, classes, sizes, work_tree):
    """All steps for all tools, on fresh repositories; returns
    {step: {tool: metrics}}."""
    base = WORK / "run"
    rmtree(base)
    # Rotate who goes first, so that no tool is always first after a warm-up.
    classes = classes[i % len(classes):] + classes[:i % len(classes)]
    ts = [c(base) for c in classes]
    for t in ts:
        t.init()
    sync_tree(TREE1, work_tree)
    stored = {t.name: t.stored_bytes() for t in ts}
    res = {s: {} for s in STEPS}
    for step in STEPS:
        if step == "tree_incr":
            sync_tree(TREE2, work_tree)
        inputs = {"tree_first": work_tree, "tree_incr": work_tree, "dump_first": DUMP1, "dump_changed": DUMP2}
        if step in inputs:
            warm(inputs[step])
        else:
            for t in ts:
                warm(t.repo)
        label = {"tree_first": "tree1", "tree_incr": "tree2", "dump_first": "dump1", "dump_changed": "dump2",
                 "restore_tree": "tree2", "restore_dump": "dump2"}[step]
        for t in ts:
            log(f"run {i + 1}: {step} {t.name}")
            target, out = RESTORE / t.name, RESTORE / f"{t.name}.sql"
            if step.startswith("tree_"):
                m = tools.timed(t, "backup_tree", label, src=work_tree, logname=step)
            elif step.startswith("dump_"):
                m = tools.timed(t, "backup_stdin", label, src=inputs[step], logname=step)
            elif step == "restore_tree":
                target.mkdir(parents=True)
                m = tools.timed(t, "restore_tree", label, target=target, logname=step)
                check_tree(tree_root(TREE2), t.restored_tree(target, work_tree))
                rmtree(target)
            else:
                RESTORE.mkdir(parents=True, exist_ok=True)
                m = tools.timed(t, "restore_stdin", label, out=out, logname=step)
                check_file(DUMP2, out)
                out.unlink()
            if step in inputs:
                now = t.stored_bytes()
                m["stored_after"], m["stored_added"] = now, now - stored[t.name]
                stored[t.name] = now
            m["input_bytes"] = sizes[step]
            res[step][t.name] = m
    rmtree(base)  # the repositories take several GB
    return res


def median_results(runs):
    """Per step and tool, the median of every numeric metric."""
    out = {}
    for step in STEPS:
        out[step] = {}
        for tool in runs[0][step]:
            ms = [r[step][tool] for r in runs]
            out[step][tool] = {k: statistics.median(m[k] for m in ms)
                               for k, v in ms[0].items() if isinstance(v, (int, float))}
    return out


def machine():
    model = next((line.split(":", 1)[1].strip() for line in output(["lscpu"]).splitlines()
                  if line.startswith("Model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem:.0f} GiB RAM, {model}, {platform.platform()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3")),
                    help="runs per tool; the table shows medians (default $BENCH_RUNS or 3)")
    ap.add_argument("--quick", action="store_true", help="one run")
    ap.add_argument("--tools", default=os.environ.get("BENCH_TOOLS", "bkp,restic,borg,rustic"),
                    help="comma-separated; rustic is skipped when not installed")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    man = load_manifest()
    if "sizes" not in man:
        die("no prepared data: run `scripts/bench/prepare.py` (or `make bench`)")
    sz = man["sizes"]
    sizes = {"tree_first": sz["tree1_bytes"], "tree_incr": sz["tree2_bytes"], "dump_first": sz["dump1_bytes"],
             "dump_changed": sz["dump2_bytes"], "restore_tree": sz["tree2_bytes"], "restore_dump": sz["dump2_bytes"]}
    classes = tools.available(args.tools.split(","))
    work_tree = WORK / "src" / tree_root(TREE1).name
    started = datetime.datetime.now()
    all_runs = []
    for i in range(runs):
        all_runs.append(one_run(i, classes, sizes, work_tree))
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M"),
        "minutes": round((datetime.datetime.now() - started).total_seconds() / 60, 1),
        "machine": machine(),
        "runs": runs,
        "command": "make bench" + (" BENCH_RUNS=1" if runs == 1 else f" BENCH_RUNS={runs}"),
        "bkp_commit": output(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"]).strip(),
        "versions": {c.name: tools.version(c.name) for c in classes},
        "data": {**sz, **man.get("tree_changes", {})},
    }
    med = median_results(all_runs)
    # Timed after the runs, on an idle client: one core per stage.
    fl = floor.measure() if "bkp" in [c.name for c in classes] and os.environ.get("BENCH_FLOOR") != "0" else None
    table = markdown(meta, med, [c.name for c in classes], fl)
    sync_res = []
    if os.environ.get("BENCH_SYNC", "1") != "0" and any(c.name == "bkp" for c in classes):
        import sync
        for src in [DUMP1, tree_root(TREE1)]:
            log(f"sync: {src}")
            sync_res.append(sync.measure(src, base_dir=WORK))
        table += sync_markdown(sync_res)
        meta["minutes"] = round((datetime.datetime.now() - started).total_seconds() / 60, 1)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps({"meta": meta, "median": med, "floor": fl, "runs": all_runs,
                                                             "sync": sync_res},
                                                            indent=1) + "\n")
    (RESULTS / f"bench-{stamp}.md").write_text(table)
    log(f"saved {RESULTS}/bench-{stamp}.json and .md")


if __name__ == "__main__":
    main()
