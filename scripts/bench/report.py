"""The Markdown tables of a bench run (medians over runs)."""

import floor

# Issue 5's targets: bkp's MB/s over the fastest peer's, per step.
TARGETS = {"tree_first": 3, "tree_incr": 5, "dump_first": 3, "dump_changed": 3, "restore_tree": 3,
           "restore_dump": 3}
LABELS = {"tree_first": "first backup, tree", "tree_incr": "incremental, changed tree",
          "dump_first": "first dump (stdin)", "dump_changed": "changed dump (stdin)",
          "restore_tree": "restore tree", "restore_dump": "restore dump (stdout)"}
RSS_TARGET_MB = 256

NOTES = """\
Notes: each step is run by every tool in turn before the next step (the
first tool rotates per run); every run starts from empty repositories and
empty caches. Inputs are read once before each step, so every tool reads
from the page cache (caches are not dropped), and dirty pages are
written back (`sync`) before each tool's step. Restores are written to
tmpfs (/dev/shm) when it has room: on ext4, after the harness deleted a
few trees, creating 78,000 files cost every tool up to 50 s of inode
allocator time. bkp's server is started
before and stopped after each step; its CPU and peak RSS are its own
rusage. MB/s = input bytes / wall seconds. Stored = `du` of the repository
(bkp: the server's data directory). zstd level 3 for all (restic:
`--compression auto`). restic always encrypts; borg runs `-e none`; bkp has
no encryption at rest. Ratio = bkp / fastest peer (for stored bytes and
RSS: bkp / smallest peer, lower is better)."""


def mb(b):
    return b / 1e6


def markdown(meta, med, names, fl=None):
    peers = [n for n in names if n != "bkp"]
    d = meta["data"]
    lines = [
        f"## bkp benchmark, {meta['date']}",
        "",
        f"- Machine: {meta['machine']}",
        f"- Command: `{meta['command']}` ({meta['runs']} run(s), medians; {meta['minutes']} min in all)",
        f"- bkp commit {meta['bkp_commit']}; " + "; ".join(f"{v}" for k, v in meta["versions"].items() if k != "bkp"),
        f"- Data: tree {mb(d['tree1_bytes']):.0f} MB in {d['tree1_files']} files; changed tree: "
        f"{d.get('edited', '?')} edited, {d.get('deleted', '?')} deleted, {d.get('added', '?')} added; "
        f"dumps {mb(d['dump1_bytes']):.0f} MB and {mb(d['dump2_bytes']):.0f} MB",
        "",
        "| step | MB | " + " | ".join(f"{n} MB/s" for n in names) + " | bkp / best peer | target | met |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|:-:|",
    ]
    for step, target in TARGETS.items():
        rates = {n: mb(med[step][n]["input_bytes"]) / med[step][n]["wall"] for n in names}
        row = [LABELS[step], f"{mb(med[step][names[0]]['input_bytes']):.0f}"] + [f"{rates[n]:.1f}" for n in names]
        if "bkp" in rates and peers:
            ratio = rates["bkp"] / max(rates[p] for p in peers)
            row += [f"{ratio:.2f}x", f">= {target}x", "yes" if ratio >= target else "**no**"]
        else:
            row += ["", f">= {target}x", ""]
        lines.append("| " + " | ".join(row) + " |")
    stored = {n: med["dump_changed"][n]["stored_after"] for n in names}
    rss = {n: max(med[s][n]["client_rss_kb"] for s in TARGETS) / 1024 for n in names}
    for label, vals, target, ok in [
        ("stored MB, all four backups", {n: mb(v) for n, v in stored.items()}, "<= 1.00x", None),
        ("client peak RSS MB (max of steps)", rss, f"<= {RSS_TARGET_MB} MB", rss.get("bkp", 0) <= RSS_TARGET_MB),
    ]:
        row = [label, ""] + [f"{vals[n]:.0f}" for n in names]
        if "bkp" in vals and peers:
            ratio = vals["bkp"] / min(vals[p] for p in peers)
            ok = ratio <= 1.0 if ok is None else ok
            row += [f"{ratio:.2f}x", target, "yes" if ok else "**no**"]
        else:
            row += ["", target, ""]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "Per step and tool (medians): CPU is user+sys seconds; cores = CPU / wall.", "",
              "| step | tool | wall s | client CPU s | server CPU s | cores | client RSS MB | server RSS MB "
              "| stored +MB | bkp: chunks sent / total |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for step in TARGETS:
        for n in names:
            m = med[step][n]
            ccpu, scpu = m["user"] + m["sys"], m.get("server_user", 0) + m.get("server_sys", 0)
            srv = f"{scpu:.1f}" if "server_user" in m else ""
            srss = f"{m['server_rss_kb'] / 1024:.0f}" if "server_rss_kb" in m else ""
            added = f"{mb(m['stored_added']):.1f}" if "stored_added" in m else ""
            chunks = f"{m['bkp_report.chunks_sent']:.0f} / {m['bkp_report.chunks']:.0f}" \
                if "bkp_report.chunks" in m else ""
            lines.append(f"| {LABELS[step]} | {n} | {m['wall']:.1f} | {ccpu:.1f} | {srv} | "
                         f"{(ccpu + scpu) / m['wall']:.2f} | {m['client_rss_kb'] / 1024:.0f} | {srss} | {added} "
                         f"| {chunks} |")
    lines += floor.markdown(med, fl, LABELS)
    lines += ["", NOTES, ""]
    return "\n".join(lines)


SYNC_STEPS = [("bkp_push", "bkp push"), ("bkp_sync", "bkp-server sync"), ("restic_backup", "restic backup"),
              ("restic_copy", "restic copy")]


def sync_markdown(results):
    """The second-site table: one run per data set (issue 19's target:
    sync at least as fast as bkp's push of the same data)."""
    lines = ["## Sync to a second server (one run)", "",
             "MB/s = the data's logical size / wall seconds; both servers and both restic repositories on "
             "this machine.", "",
             "| data | MB | " + " | ".join(f"{label} MB/s" for _, label in SYNC_STEPS)
             + " | sync transferred MB | sync / push | target | met |",
             "|---|---:|" + "---:|" * len(SYNC_STEPS) + "---:|---:|---:|:-:|"]
    for r in results:
        rates = r["mb_s"]
        cells = [f"{rates[k]:.0f}" if k in rates else "" for k, _ in SYNC_STEPS]
        ratio = rates["bkp_sync"] / rates["bkp_push"]
        lines.append(f"| {r['data']} | {mb(r['bytes']):.0f} | " + " | ".join(cells)
                     + f" | {mb(r['sync_transferred_bytes']):.0f} | {ratio:.2f}x | >= 1.00x | "
                     + ("yes" if ratio >= 1.0 else "**no**") + " |")
    return "\n".join(lines + [""]) + "\n"
