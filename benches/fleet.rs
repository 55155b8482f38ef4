//! `bkp-fleet`: the parts of the benchmark harness that need the libraries
//! (`make bench-fleet`, scripts/bench/fleet.py; and the CPU floor of
//! `make bench`, scripts/bench/floor.py). Not installed, not for users.
//!
//! * `prefill`: grows a stopped server's store to N chunks of synthetic
//!   data, written through the store API (`RocksStore::put_chunks` and
//!   `commit_snapshot`, as a push would leave them) instead of pushed, so
//!   20 M chunks take minutes. Every chunk is referenced by a snapshot of
//!   host `prefill` (stream snapshots of one file each), so GC has to keep
//!   them and the verify drill can rebuild them (content hashes are true).
//! * `forget`: deletes the oldest prefill snapshots holding a share of the
//!   prefill chunks (what a GC then has to find and free).
//! * `probe`: while a load runs, asks the server HasChunks of 1024 ids
//!   (half known, half new) in a loop and prints the latencies.
//! * `floor`: the one-core throughput of each CPU stage of a push and a
//!   restore (the stages `make bench-micro` times: FastCDC, blake3,
//!   zstd level 3, the server's decode and re-hash) on given data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bkp_client::config::{ClientConfig, Trust};
use bkp_client::conn::Client;
use bkp_common::snapshot::{Snapshot, SnapshotKind, SnapshotStats};
use bkp_common::tree::{ChunkRef, Entry, Meta, TreeEncoder, MAX_CHUNKS_PER_RECORD};
use bkp_common::{blob, chunker, ChunkId, ContentHash};
use bkp_server::store::rocks::RocksStore;
use bkp_server::store::VerifiedChunk;

const HOST: &str = "prefill";
const SET: &str = "prefill";
/// The server's default `cache_mb`.
const CACHE_BYTES: usize = 128 << 20;
/// Chunks per `put_chunks` call: one RocksDB batch each.
const PUT_BATCH: usize = 4096;
const STATE_FILE: &str = "fleet-prefill.json";

fn usage() -> ! {
    eprintln!(
        "usage: bkp-fleet prefill --data DIR --chunks N [--chunk-bytes B] [--snapshot-chunks K]\n\
         \x20      bkp-fleet forget --data DIR --share S\n\
         \x20      bkp-fleet probe --server ADDR --fingerprint FP --token-file F --stop FILE\n\
         \x20      bkp-fleet floor [--tree DIR] [--file F]... [--limit-mb M]"
    );
    std::process::exit(2)
}

/// `--name value` pairs (repeatable); anything else is a usage error.
struct Args(Vec<(String, String)>);

impl Args {
    fn parse(rest: &[String]) -> Self {
        let mut out = Vec::new();
        let mut it = rest.iter();
        while let Some(k) = it.next() {
            let Some(k) = k.strip_prefix("--") else { usage() };
            let Some(v) = it.next() else { usage() };
            out.push((k.to_string(), v.clone()));
        }
        Self(out)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn all(&self, k: &str) -> Vec<&str> {
        self.0.iter().filter(|(n, _)| n == k).map(|(_, v)| v.as_str()).collect()
    }

    fn need(&self, k: &str) -> &str {
        self.get(k).unwrap_or_else(|| {
            eprintln!("bkp-fleet: --{k} is required");
            usage()
        })
    }

    fn num(&self, k: &str, default: u64) -> u64 {
        self.get(k).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("--{k}: not a number: {v}")))
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else { usage() };
    let a = Args::parse(rest);
    let out = match cmd.as_str() {
        "prefill" => prefill(
            Path::new(a.need("data")),
            a.num("chunks", 0),
            a.num("chunk-bytes", 64) as usize,
            a.num("snapshot-chunks", 0),
        ),
        "forget" => forget(Path::new(a.need("data")), a.need("share").parse().expect("--share: a number")),
        "probe" => probe(&a),
        "floor" => floor(a.get("tree").map(PathBuf::from), &a.all("file"), a.num("limit-mb", 384) as usize),
        _ => usage(),
    };
    println!("{out}");
}

/// What earlier prefill runs of this data directory wrote.
#[derive(Default)]
struct State {
    chunks: u64,
    snapshots: u64,
    stored_bytes: u64,
}

impl State {
    fn load(data: &Path) -> Self {
        let Ok(s) = std::fs::read_to_string(data.join(STATE_FILE)) else { return Self::default() };
        let v: serde_json::Value = serde_json::from_str(&s).expect("prefill state file");
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Self { chunks: n("chunks"), snapshots: n("snapshots"), stored_bytes: n("stored_bytes") }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"chunks": self.chunks, "snapshots": self.snapshots, "stored_bytes": self.stored_bytes})
    }

    fn save(&self, data: &Path) {
        let tmp = data.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, self.json().to_string()).expect("write prefill state");
        std::fs::rename(tmp, data.join(STATE_FILE)).expect("rename prefill state");
    }
}

/// A stored-codec blob (docs/FORMAT.md) of `data`: the prefill's time goes
/// to the store, not to zstd (its chunks are random and would not shrink).
fn stored_blob(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(blob::HEADER_LEN + data.len());
    b.extend_from_slice(blob::MAGIC);
    b.push(blob::VERSION);
    b.push(0);
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// Chunk number `n`: `len` bytes of blake3's output stream keyed by n,
/// so every chunk is distinct and incompressible.
fn synthetic(n: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(b"bkp-fleet prefill");
    h.update(&n.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

fn open(data: &Path) -> RocksStore {
    RocksStore::open(&data.join("db"), CACHE_BYTES).unwrap_or_else(|e| {
        eprintln!("bkp-fleet: cannot open the store in {} (stop the server first): {e}", data.display());
        std::process::exit(1)
    })
}

fn verified(data: &[u8]) -> VerifiedChunk {
    VerifiedChunk::verify(ChunkId::of(data), stored_blob(data)).expect("a valid stored blob")
}

/// Grows the store to `target` prefill chunks, in snapshots of
/// `per_snapshot` chunks (0: a hundredth of what this run adds, at least
/// 512, so every size step adds about 100 snapshots).
fn prefill(data: &Path, target: u64, chunk_bytes: usize, per_snapshot: u64) -> serde_json::Value {
    let mut st = State::load(data);
    let t = Instant::now();
    let add = target.saturating_sub(st.chunks);
    let per = if per_snapshot > 0 { per_snapshot } else { add.div_ceil(100).max(512) };
    let store = open(data);
    let mut tree_chunks = 0u64;
    let mut said = Instant::now();
    while st.chunks < target {
        let k = per.min(target - st.chunks);
        let mut refs = Vec::with_capacity(k as usize);
        let mut hasher = blake3::Hasher::new();
        let mut batch = Vec::with_capacity(PUT_BATCH);
        for n in st.chunks..st.chunks + k {
            let d = synthetic(n, chunk_bytes);
            hasher.update(&d);
            let c = verified(&d);
            refs.push(ChunkRef { id: *c.id(), len: d.len() as u32 });
            st.stored_bytes += c.blob().len() as u64;
            batch.push(c);
            if batch.len() == PUT_BATCH {
                store.put_chunks(HOST, &batch).expect("put_chunks");
                batch.clear();
            }
        }
        // The snapshot's tree: one file holding the k chunks.
        let mut enc = TreeEncoder::new();
        let size = k * chunk_bytes as u64;
        let path = format!("prefill-{:08}", st.snapshots).into_bytes();
        enc.push(&Entry::File { path, meta: Meta { mode: 0o600, ..Meta::default() }, size });
        for part in refs.chunks(MAX_CHUNKS_PER_RECORD) {
            enc.push(&Entry::Chunks(part.to_vec()));
        }
        let hash = if k == 1 { ContentHash::from_bytes(*refs[0].id.as_bytes()) } else { hasher.finalize().into() };
        enc.push(&Entry::FileEnd { hash });
        let stream = enc.take();
        let mut tree = Vec::new();
        for (o, l) in chunker::cut_points(&stream) {
            let c = verified(&stream[o..o + l]);
            tree.push(*c.id());
            st.stored_bytes += c.blob().len() as u64;
            batch.push(c);
        }
        tree_chunks += tree.len() as u64;
        store.put_chunks(HOST, &batch).expect("put_chunks");
        let snap = Snapshot {
            host: HOST.into(),
            name: SET.into(),
            // Oldest first, a second apart, long before any push.
            time_ns: 1_000_000_000 * (1 + st.snapshots),
            kind: SnapshotKind::Stream,
            stats: SnapshotStats { files: 1, dirs: 0, others: 0, bytes: size, data_chunks: k },
            tree,
            client: "bkp-fleet prefill".into(),
        };
        store.commit_snapshot(&snap, None).expect("commit_snapshot");
        st.chunks += k;
        st.snapshots += 1;
        st.save(data);
        if said.elapsed() > Duration::from_secs(30) {
            said = Instant::now();
            eprintln!("prefill: {} of {target} chunks, {:.0} s", st.chunks, t.elapsed().as_secs_f64());
        }
    }
    drop(store);
    let mut out = st.json();
    out["seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
    out["added"] = serde_json::json!(add);
    out["tree_chunks_added"] = serde_json::json!(tree_chunks);
    out
}

/// Deletes the oldest prefill snapshots until `share` of the prefill
/// chunks have lost their snapshot.
fn forget(data: &Path, share: f64) -> serde_json::Value {
    let mut st = State::load(data);
    let store = open(data);
    let want = (st.chunks as f64 * share).ceil() as u64;
    let (mut chunks, mut snaps) = (0u64, 0u64);
    for s in store.list_snapshots(Some(HOST), Some(SET)).expect("list_snapshots") {
        if chunks >= want {
            break;
        }
        if store.delete_snapshot(&s.id).expect("delete_snapshot") {
            chunks += s.stats.data_chunks;
            snaps += 1;
        }
    }
    // The forgotten chunks no longer count towards the prefill's size:
    // the next prefill tops the store up again with new ones.
    st.chunks -= chunks.min(st.chunks);
    st.save(data);
    serde_json::json!({"snapshots_forgotten": snaps, "chunks_forgotten": chunks, "prefill_chunks_left": st.chunks})
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// HasChunks latency under load: 512 ids this probe uploaded (known) and
/// 512 new ones per query, one query at a time, until `--stop` exists.
fn probe(a: &Args) -> serde_json::Value {
    let token = std::fs::read_to_string(a.need("token-file")).expect("token file").trim().to_string();
    let cfg = ClientConfig {
        server: a.need("server").to_string(),
        trust: Trust::Fingerprint(a.need("fingerprint").to_string()),
        token,
        timeout: Duration::from_secs(60),
    };
    let stop = PathBuf::from(a.need("stop"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let c = Arc::new(Client::connect(&cfg).await.expect("probe: connect"));
        let session = c.start_push("probe", SnapshotKind::Stream).await.expect("probe: start push");
        let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let known: Vec<(ChunkId, Vec<u8>)> = (0..512u64)
            .map(|i| {
                let d = synthetic(t0 ^ (i << 48), 64);
                (ChunkId::of(&d), stored_blob(&d))
            })
            .collect();
        let ids: Vec<ChunkId> = known.iter().map(|k| k.0).collect();
        c.put(session, known).await.expect("probe: put");
        let mut lat = Vec::new();
        let mut n = 0u64;
        while !stop.exists() {
            let mut q = ids.clone();
            q.extend((0..512u64).map(|i| ChunkId::of(&[t0.to_le_bytes(), n.to_le_bytes(), i.to_le_bytes()].concat())));
            n += 1;
            let t = Instant::now();
            let missing = c.missing(session, q).await.expect("probe: HasChunks");
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(missing.len(), 512, "the probe's own 512 chunks must be known, the rest new");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lat.sort_by(f64::total_cmp);
        serde_json::json!({"queries": lat.len(), "ids_per_query": 1024, "p50_ms": percentile(&lat, 0.5),
                           "p95_ms": percentile(&lat, 0.95), "max_ms": lat.last().copied().unwrap_or(0.0)})
    })
}

/// Files of a tree (or the given files) read into memory, at most
/// `limit_mb` MB, so the stages below time CPU and not the disk.
fn load_inputs(tree: Option<PathBuf>, files: &[&str], limit: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut stack: Vec<PathBuf> = tree.into_iter().collect();
    let mut paths: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
    while let Some(d) = stack.pop() {
        let mut es: Vec<_> = std::fs::read_dir(&d).expect("read_dir").flatten().collect();
        es.sort_by_key(|e| e.file_name());
        for e in es {
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                paths.push(e.path());
            }
        }
    }
    for p in paths {
        if total >= limit {
            break;
        }
        let mut d = std::fs::read(&p).expect("read input");
        d.truncate(limit - total);
        total += d.len();
        out.push(d);
    }
    out
}

/// The clock that std does not offer; the only unsafe in this binary.
#[allow(unsafe_code)]
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Seconds of one core per stage over `inputs` (each one file).
fn floor(tree: Option<PathBuf>, files: &[&str], limit_mb: usize) -> serde_json::Value {
    let inputs = load_inputs(tree, files, limit_mb << 20);
    let bytes: usize = inputs.iter().map(Vec::len).sum();
    // CPU time of this thread, not wall time: on a shared machine the
    // wall clock counts other processes' turns too.
    let time = |f: &mut dyn FnMut()| {
        let t = thread_cpu();
        f();
        thread_cpu() - t
    };
    // The chunks as the client cuts them: a file under the minimum chunk
    // size is one chunk and is not scanned.
    let mut chunks: Vec<&[u8]> = Vec::new();
    let cdc = time(&mut || {
        for d in &inputs {
            if d.len() <= chunker::MIN_CHUNK as usize {
                chunks.push(d);
            } else {
                chunks.extend(chunker::cut_points(d).into_iter().map(|(o, l)| &d[o..o + l]));
            }
        }
    });
    let mut ids = Vec::with_capacity(chunks.len());
    let ids_s = time(&mut || ids.extend(chunks.iter().map(|c| ChunkId::of(c))));
    // The file content hash: a second pass for files of several chunks
    // (a one-chunk file's hash is its chunk id).
    let multi: Vec<&Vec<u8>> = inputs.iter().filter(|d| d.len() > chunker::MIN_CHUNK as usize).collect();
    let file_hash = time(&mut || {
        for d in &multi {
            std::hint::black_box(blake3::hash(d));
        }
    });
    let mut enc = blob::Encoder::new(3);
    let mut blobs = Vec::with_capacity(chunks.len());
    let zstd = time(&mut || blobs.extend(chunks.iter().map(|c| enc.encode(c))));
    let decode = time(&mut || {
        for (b, id) in blobs.iter().zip(&ids) {
            std::hint::black_box(blob::decode_verified(b, id).expect("decodes"));
        }
    });
    let stored: usize = blobs.iter().map(Vec::len).sum();
    let mb = bytes as f64 / 1e6;
    let per_mb = |s: f64| s / mb;
    // A push: cut, chunk ids, file hashes, zstd on the client; decode and
    // re-hash on the server. A restore: decode and check on the client,
    // the file hash again (the server only reads).
    let push = cdc + ids_s + file_hash + zstd + decode;
    let restore = decode + file_hash;
    serde_json::json!({
        "bytes": bytes, "files": inputs.len(), "chunks": chunks.len(), "stored_bytes": stored,
        "mb_per_s": {"fastcdc": mb / cdc, "blake3_ids": mb / ids_s,
                     "blake3_file_hash": if file_hash > 0.0 { mb / file_hash } else { 0.0 },
                     "zstd3": mb / zstd, "decode_rehash": mb / decode},
        "cpu_s_per_mb": {"fastcdc": per_mb(cdc), "blake3_ids": per_mb(ids_s), "blake3_file_hash": per_mb(file_hash),
                         "zstd3": per_mb(zstd), "decode_rehash": per_mb(decode),
                         "push": per_mb(push), "restore": per_mb(restore),
                         "push_known": per_mb(cdc + ids_s + file_hash)},
    })
}
