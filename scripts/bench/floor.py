"""The CPU floor of each `make bench` step, and bkp's share of it.

`bkp-fleet floor` times, on one core, each CPU stage a push runs (FastCDC,
blake3 for chunk ids and file hashes, zstd level 3 on the client, the
server's decode and re-hash) and a restore runs (decode and check, file
hashes), the same functions `make bench-micro`'s `stages` times, but on
the benchmark's own data (the tree's first 384 MB, file by file; the
dump). A step's floor is what those stages alone cost for its bytes,
spread perfectly over the machine's cores:

  push      chunked MB x (cdc + ids + file hash) + new MB x (zstd + decode)
  restore   MB x (decode + file hash)

where new MB is what was sent (bkp's report), scaled back from stored to
raw bytes with the data's compression ratio. Everything else (reading
and writing files, QUIC and TLS, RocksDB, waiting) is above the floor.
Share = floor / wall: 100% would be every core busy with these stages
only. On a shared machine wall times include other processes' turns, so
the table also gives floor CPU / bkp's CPU (client + server rusage),
which load moves much less. The incremental tree push chunks only the changed files, whose
bytes bkp does not report: its floor counts the new chunks only.
"""

import json
import os

from common import BKP, DUMP1, TARGET, TREE1, log, output, tree_root

FLEET = TARGET / "release/bkp-fleet"


def measure():
    """{"tree": ..., "dump": ...}: `bkp-fleet floor` figures per data."""
    if not FLEET.exists():
        log(f"floor: {FLEET} missing, no floor figures")
        return None
    log("floor: timing each stage on one core (tree sample, dump)")
    tree = json.loads(output([FLEET, "floor", "--tree", tree_root(TREE1), "--limit-mb", "384"]))
    dump = json.loads(output([FLEET, "floor", "--file", DUMP1]))
    return {"tree": tree, "dump": dump, "cores": os.cpu_count(), "bkp": str(BKP)}


STEPS = {"tree_first": ("tree", "push"), "tree_incr": ("tree", "push_new"), "dump_first": ("dump", "push"),
         "dump_changed": ("dump", "push"), "restore_tree": ("tree", "restore"), "restore_dump": ("dump", "restore")}


def floor_seconds(step, m, fl):
    data, kind = STEPS[step]
    f = fl[data]
    c = f["cpu_s_per_mb"]
    mb = m["input_bytes"] / 1e6
    if kind == "restore":
        cpu = mb * c["restore"]
    else:
        raw_per_stored = f["bytes"] / f["stored_bytes"]
        new_mb = m.get("bkp_report.bytes_sent", 0) / 1e6 * raw_per_stored
        chunked = 0 if kind == "push_new" else mb
        cpu = chunked * c["push_known"] + new_mb * (c["zstd3"] + c["decode_rehash"])
    return cpu / fl["cores"]


def markdown(med, fl, labels):
    if not fl:
        return []
    t, d = fl["tree"]["mb_per_s"], fl["dump"]["mb_per_s"]
    lines = ["", f"bkp against the CPU floor ({fl['cores']} cores; one-core stage MB/s on the tree sample / the "
             f"dump: FastCDC {t['fastcdc']:.0f} / {d['fastcdc']:.0f}, blake3 ids {t['blake3_ids']:.0f} / "
             f"{d['blake3_ids']:.0f}, zstd 3 {t['zstd3']:.0f} / {d['zstd3']:.0f}, decode + re-hash "
             f"{t['decode_rehash']:.0f} / {d['decode_rehash']:.0f}; scripts/bench/floor.py says how):", "",
             "| step | wall s | floor s | share of floor (floor / wall) | client + server CPU s | floor CPU s "
             "| floor CPU / CPU |", "|---|---:|---:|---:|---:|---:|---:|"]
    for step in STEPS:
        m = med[step].get("bkp")
        if not m:
            continue
        fs = floor_seconds(step, m, fl)
        cpu = m["user"] + m["sys"] + m.get("server_user", 0) + m.get("server_sys", 0)
        fcpu = fs * fl["cores"]
        lines.append(f"| {labels[step]} | {m['wall']:.2f} | {fs:.2f} | {100 * fs / m['wall']:.0f}% | {cpu:.1f} | "
                     f"{fcpu:.2f} | {100 * fcpu / cpu:.0f}% |")
    return lines
