//! bkp-server: the QUIC endpoint, push sessions, snapshot commits, the
//! jobs (prune, GC, verify), monitoring, and the chunk store. This is the
//! server's design doc; docs/ARCHITECTURE.md covers the whole system and
//! [`store`] the storage design.
//!
//! # Layers
//! From the network down; a module imports only from layers below it (no
//! import cycle: `layering.rs` checks this from the sources).
//!
//! | layer | modules | holds |
//! |-------|---------|-------|
//! | outer: transports and tasks | `cli`, [`server`] (endpoint, monitor loop, token watcher), `connection` (hello, frame budgets, upload batching, pacing), [`control`] (control socket), `http`, [`schedule`], [`state`] | [`ServerState`], the only place it is used |
//! | requests | [`service`]: `push`, `read`, `admin`, one function per request | the store, `&Sessions`, a [`service::Caller`] |
//! | jobs and monitoring | [`jobs`], [`gc`], [`prune`], [`verify`], [`sync`] (pull from another server), [`monitor`], [`status`], [`metrics`], [`alerts`], [`freshness`], [`push_failures`], [`audit`] | narrow views: [`jobs::Jobs`], [`sync::Ctx`], [`monitor::Inputs`] |
//! | rules | [`sessions`] (leases, the GC fence), [`commit`] (tree checks), [`tree_read`] (the one tree reader), [`limits`], [`tokens`], [`tls`], [`config`] (and what a reload may change) | |
//! | records | [`report`] (job records and each kind's report, typed: the store persists them), [`retention`] (the pure planner their prune report holds), [`clock`] | |
//! | storage | [`store`]: [`store::MetaStore`] + [`store::ChunkStore`], `rocks`, `object`, `schema` | RocksDB (and an object store) |
//!
//! # A chunk's path
//! 1. The client sends `PutChunk { session, id, blob }` frames on an upload
//!    stream. `connection` admits each frame's length against three memory
//!    budgets (connection, token, server) before reading it, gathers up to
//!    64 chunks or 1 MiB, and paces a batch that inflates far beyond its
//!    bytes.
//! 2. [`service::push::put_batch`] decompresses and re-hashes every blob
//!    ([`store::VerifiedChunk::verify`]: a blob that does not hash to its id
//!    refuses the batch), enters the session (the read side of the GC
//!    fence), calls [`store::MetaStore::put_chunks`] and touches the ids in
//!    the session, so a sweep spares them until the commit.
//! 3. `put_chunks` decides which chunks are new, has the chunk backend
//!    stage their data ([`store::ChunkStore::stage_data`]), adds the
//!    `chunk_meta` and possession rows, and writes one RocksDB batch.
//! 4. `Commit { session, tree }`: [`service::push::commit`] walks the tree
//!    ([`commit::check_tree`] over [`tree_read::TreeEntries`]): every path
//!    one a restore accepts, every reference proven by this host (touched
//!    in the session, or a possession record), then the daily budget; then
//!    [`store::MetaStore::commit_snapshot`] makes the data durable
//!    ([`store::ChunkStore::persist`]) and writes the snapshot in one synced
//!    batch, and the session ends.
//! 5. Back: `GetChunks { ids }` (at most `MAX_FETCH`):
//!    [`service::read::authorize_fetch`] requires the caller's host to hold
//!    each id (an admin reads any); [`service::read::read_blobs`] reads the
//!    blobs about 1 MiB per blocking task ([`store::ChunkStore::chunk_blob`]);
//!    `connection` sends one `Chunk` frame each, and the client checks each
//!    blob's hash as it decodes it.
//!
//! Every service function blocks (RocksDB, decompression): the transports
//! call it on `spawn_blocking`.
//!
//! # Chunk data in a bucket (`[storage] backend = "s3"`)
//! [`store::s3::S3Chunks`] is the second [`store::ChunkStore`]; metadata,
//! locations and a copy of every tree chunk stay in the local RocksDB.
//! * Push: chunks are appended to an open pack (`BKPK`, docs/FORMAT.md);
//!   a full pack is PUT create-only in the background (3 in flight, at
//!   most 4 sealed packs in memory), so `put_batch` does not wait for it.
//! * Commit: [`store::ChunkStore::keep_trees`] puts the snapshot's tree
//!   chunks into a tree pack and keeps them locally (commit checks, GC
//!   marking, drills read trees without the bucket);
//!   [`store::ChunkStore::persist`] waits for every sealed pack;
//!   [`store::ChunkStore::record_snapshot`] PUTs `snapshots/<id>` (`BKPR`);
//!   then the synced snapshot batch. Acknowledged means in the bucket.
//! * Fetch: [`store::ChunkStore::chunk_blobs`] reads 8 MiB batches, ranges
//!   of one pack merged into one GET, 16 GETs in flight, cache first.
//! * GC: after the chunk sweep, [`store::ChunkStore::gc_packs`] deletes
//!   packs with no live chunk and rewrites packs under
//!   `repack_live_percent` live; its location switches run under the GC
//!   fence (the write side of the sessions' fence), and a rewritten pack is
//!   deleted by the next run, so a restore that read the old location still
//!   finds it. Cost follows the garbage: untouched packs are not read.
//! * `bkp-server rebuild`: a new data directory from pack indexes and
//!   snapshot records ([`store::s3::rebuild`]); `--take-over-lease` takes
//!   the lease of a crashed server once it has missed a renewal.
//! * Verify: the scrub walks [`store::ChunkStore::containers`] (packs, in
//!   name order, sliced and resumable like chunks) and reads each whole
//!   from the bucket ([`store::ChunkStore::scrub_container`]); a bad
//!   chunk's quarantine drops its location, its pack is copied aside.
//! * Faults: every bucket call retried with backoff for `retry_secs`, then
//!   the push fails with the bucket's error; a failed upload is kept and
//!   tried again by the next put or commit; the `bucket` alert and
//!   `bkp_s3_*` metrics come from [`store::ChunkStore::backend_stats`].
//!
//! # Memory and GC cost
//! What grows with the data is bounded by configuration: the touched sets
//! of all push sessions by `limits.touched_mb` (exact sets, then one
//! shared filter that fences GC but proves nothing: [`sessions`]), a GC's
//! mark set by `[gc] mark_memory_mb` (then the `gc_mark` scratch column
//! family, same result: [`gc::mark`]), job records by `[jobs]
//! record_days` ([`jobs`]). A GC's reclaim step rewrites chunk data only
//! where more than `[gc] rewrite_garbage_percent` of it is garbage
//! ([`store::ChunkStore::reclaim_space_with`]; the local backend's policy
//! is in `store::rocks::chunks`, the design in docs/ARCHITECTURE.md
//! "Garbage collection").
//!
//! # Which operations may overlap
//! The one table; `store`, `gc` and docs/ARCHITECTURE.md link here.
//!
//! | pair | allowed | why it is safe |
//! |------|---------|----------------|
//! | push / push (any hosts, even the same set) | yes | chunk puts are idempotent (same key, same bytes; a race may count a chunk as new twice); each commit is a single batch |
//! | push / restore, push / list | yes | readers see only committed snapshots |
//! | restore / restore | yes | read-only |
//! | push / GC | yes | every chunk a push was told is stored, uploaded or referenced is in its session's `touched` set; each sweep batch runs under the write side of the session fence and spares touched chunks (see [`sessions`]) |
//! | commit / GC | yes | a commit touches every chunk it checks, under the fence; a snapshot committed after the mark phase listed snapshots keeps its chunks in `gc_protect` until the GC ends |
//! | frozen push / GC | yes | a session silent past its lease is dropped at the next sweep batch and its commit fails; `host_has` also requires the chunk itself, so a stale possession record never lets a push skip an upload |
//! | prune or forget / GC | yes | deleting a snapshot only removes its record; a snapshot gone when mark reaches it is skipped; one deleted after it was marked keeps its chunks until the next GC |
//! | restore / GC | yes, for snapshots not being deleted | restores read committed snapshots; GC never frees a chunk a listed snapshot references. A restore of a snapshot forgotten or pruned meanwhile fails (`NotFound`) once a GC frees its chunks |
//! | prune / GC | yes | separate locks; prune only deletes snapshot records |
//! | sync / GC (on the secondary) | yes | each snapshot's copy is a push session of its host: every chunk it is told is held, adopts or stores is touched under the fence, and its commit is a push's commit |
//! | sync / push, sync / restore | yes | as push / push and push / restore |
//! | sync / sync of one `[[sync]]` job | no | one run per job at a time ([`jobs::run_sync`]); the second is refused, "already in progress", no failure. Two jobs (two remotes) may run at once |
//! | sync / prune (on the secondary) | yes | separate locks; a copy pruned after it was made is remembered as copied and not fetched again |
//! | verify / push | yes | a quarantined chunk is gone from `chunks`/`chunk_meta`, so `host_has` answers "missing" and the next push uploads it again; the quarantine runs under the write fence and removes the id from every session, so a commit that raced it fails ("never uploaded… push again") |
//! | pack GC / push, commit (s3) | yes | only a pack not yet uploaded gets new locations; GC takes its candidates (uploaded packs) and switches locations under the write fence, when no put batch or commit is half done |
//! | pack GC / restore (s3) | yes | a rewritten pack stays until the next GC run; a deleted pack held only unreferenced chunks |
//! | verify / GC | yes | a chunk GC deleted under the scrub is recognised (its `chunk_meta` is gone too) and not reported; a snapshot forgotten under the drill is skipped and its damage record goes with it |
//! | verify / prune | yes | separate locks; a snapshot pruned under the drill is skipped |
//! | GC / GC, prune / prune, verify / verify | no | one run of a kind at a time ([`jobs`]); the second is recorded as refused, "already in progress", and is no failure |
//! | protect / prune or forget of the same snapshot | not guarded | prune acts on the `protected` flags it read when planning; and `set_protected` rewrites the `sets` entry without a lock, so a delete landing between its read and its write leaves a `sets` entry without its record, which no command removes and which later plans still count (possibly as the set's newest) |
//! | `token create/revoke/list` / `serve` | yes | tokens live outside RocksDB; writers take a file lock, readers see whole files thanks to rename; the token watcher ends a revoked token's connections and sessions |
//! | `bkp-server prune/gc/verify/jobs/status` / `serve` | yes | through the control socket; without a running server they hold RocksDB's lock, so `serve` fails to start until they end |
//! | two `serve` on one data directory | no | `DATA/serve.lock`, then RocksDB's lock, refuse the second |

pub mod alerts;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod commit;
pub mod config;
mod connection;
pub mod control;
pub mod freshness;
pub mod gc;
mod http;
pub mod jobs;
#[cfg(test)]
mod layering;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod perms;
pub mod prune;
pub mod push_failures;
pub mod report;
pub mod retention;
pub mod schedule;
pub mod server;
pub mod service;
pub mod sessions;
pub mod state;
pub mod status;
mod status_html;
pub mod store;
pub mod sync;
pub mod tls;
pub mod tokens;
pub mod tree_read;
pub mod verify;

pub use server::{bind, run, serve};
pub use state::ServerState;
