//! One client connection: the hello handshake, then one task per stream.
//! Everything here treats the peer as hostile: lengths are capped by the
//! frame reader, every request is checked against the token's role and
//! host, and errors go back on the stream instead of ending the server.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bkp_common::io::{read_frame, read_frame_capped, write_frame, IoError};
use bkp_common::names::check_set_name;
use bkp_common::protocol::{ErrorCode, Request, Response, Role, MAGIC, MAX_IDS, VERSION};
use bkp_common::snapshot::Snapshot;
use bkp_common::ChunkId;
use quinn::{RecvStream, SendStream};
use tracing::{debug, info, warn};

use crate::commit::{check_tree, parent_refs, push_budget, CommitError};
use crate::monitor::Counters;
use crate::server::ServerState;
use crate::sessions::SessionError;
use crate::store::{StoreError, VerifiedChunk};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_MAX: usize = 4096;
/// Chunks verified and written together on an upload stream: up to this
/// many, or this many received bytes. Each batch is one blocking task and
/// one RocksDB write; with small files, 16 chunks per batch made the
/// thread hand-offs cost more than the writes.
const PUT_BATCH: usize = 64;
const PUT_BATCH_BYTES: usize = 1 << 20;
/// Chunks per GetChunks request.
pub const MAX_FETCH: usize = 64;
/// Blob bytes read per blocking task while answering GetChunks.
const FETCH_READ_BYTES: usize = 1 << 20;

struct Conn {
    state: Arc<ServerState>,
    host: String,
    role: Role,
    client: String,
}

/// An error that goes back to the client on the stream it came from.
struct Fail(ErrorCode, String);

type Reply = Result<(), Fail>;

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        if let StoreError::Protected(_) = e {
            return Fail(ErrorCode::Rejected, e.to_string());
        }
        warn!("store error: {e}");
        Fail(ErrorCode::Internal, format!("server storage error: {e}"))
    }
}

impl From<SessionError> for Fail {
    fn from(e: SessionError) -> Self {
        Fail(ErrorCode::Rejected, e.to_string())
    }
}

impl From<IoError> for Fail {
    fn from(e: IoError) -> Self {
        Fail(ErrorCode::BadRequest, e.to_string())
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Touches the references of the set's newest snapshot for this session
/// (see `commit::parent_refs` for why that is safe). Only a shortcut: on
/// any error the session goes on with store lookups.
fn prove_parent(store: &dyn crate::store::Store, guard: &crate::sessions::PushGuard<'_>) {
    let started = std::time::Instant::now();
    match parent_refs(store, &guard.info.host, &guard.info.name) {
        Ok(ids) => {
            debug!(host = %guard.info.host, name = %guard.info.name, chunks = ids.len(),
                   ms = started.elapsed().as_millis() as u64, "proved the previous snapshot's chunks");
            guard.touch(ids);
        }
        Err(e) => warn!(host = %guard.info.host, name = %guard.info.name,
                        "previous snapshot not used to prove chunks ({e}); looking them up instead"),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Fail(ErrorCode::Internal, format!("server task failed: {e}")))
}

pub async fn handle(incoming: quinn::Incoming, state: Arc<ServerState>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
    };
    let ctx = match tokio::time::timeout(HELLO_TIMEOUT, hello(&conn, state)).await {
        Ok(Ok(ctx)) => Arc::new(ctx),
        Ok(Err(msg)) => {
            info!(%remote, "refused: {msg}");
            conn.close(1u32.into(), b"refused");
            return;
        }
        Err(_) => {
            conn.close(1u32.into(), b"hello timeout");
            return;
        }
    };
    info!(%remote, host = %ctx.host, role = ctx.role.as_str(), "connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { ctx.stream(send, recv).await });
            }
            Err(e) => {
                debug!(%remote, "connection ended: {e}");
                break;
            }
        }
    }
}

async fn hello(conn: &quinn::Connection, state: Arc<ServerState>) -> Result<Conn, String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    // Unauthenticated peers get a small frame budget.
    let req: Option<Request> = read_frame_capped(&mut recv, HELLO_MAX).await.map_err(|e| e.to_string())?;
    let refuse = |code, message: String| Response::Error { code, message };
    let (token, client) = match req {
        Some(Request::Hello { magic, version, token, client }) if magic == MAGIC && version == VERSION => {
            (token, client)
        }
        Some(Request::Hello { version, .. }) => {
            let msg = format!("protocol version {version} not supported (server speaks {VERSION}); upgrade bkp");
            let _ = write_frame(&mut send, &refuse(ErrorCode::BadRequest, msg.clone())).await;
            let _ = send.finish();
            return Err(msg);
        }
        _ => return Err("first request was not a hello".into()),
    };
    let tokens = state.tokens();
    let rec = tokio::task::spawn_blocking(move || tokens.authenticate(&token))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let Some(rec) = rec else {
        let msg = "unknown or revoked token; ask the operator for a token (bkp-server token create)".to_string();
        let _ = write_frame(&mut send, &refuse(ErrorCode::Unauthorized, msg.clone())).await;
        let _ = send.finish();
        // Let the error reach the client before the close.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        return Err(msg);
    };
    let welcome = Response::Welcome { host: rec.host.clone(), role: rec.role, server: bkp_common::VERSION.to_string() };
    write_frame(&mut send, &welcome).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(Conn { state, host: rec.host, role: rec.role, client })
}

impl Conn {
    async fn stream(self: Arc<Self>, mut send: SendStream, mut recv: RecvStream) {
        let result = match read_frame::<Request, _>(&mut recv).await {
            Ok(Some(req)) => self.dispatch(req, &mut send, &mut recv).await,
            Ok(None) => Ok(()),
            Err(e) => Err(Fail::from(e)),
        };
        if let Err(Fail(code, message)) = result {
            debug!(host = %self.host, "request failed: {message}");
            let _ = write_frame(&mut send, &Response::Error { code, message }).await;
            let _ = recv.stop(0u32.into());
        }
        let _ = send.finish();
    }

    fn require(&self, allowed: &[Role]) -> Reply {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(Fail(ErrorCode::Forbidden, format!("a {} token may not do this", self.role.as_str())))
        }
    }

    async fn dispatch(&self, req: Request, send: &mut SendStream, recv: &mut RecvStream) -> Reply {
        let store = self.state.store.clone();
        let host = self.host.clone();
        let resp = match req {
            Request::Hello { .. } => return Err(Fail(ErrorCode::BadRequest, "hello sent twice".into())),
            Request::StartPush { name, kind } => {
                self.require(&[Role::Push, Role::Admin])?;
                check_set_name(&name).map_err(|e| Fail(ErrorCode::BadRequest, e.to_string()))?;
                Response::PushStarted { session: self.state.sessions.start(&self.host, &name, kind) }
            }
            Request::HasChunks { session, ids } => {
                self.require(&[Role::Push, Role::Admin])?;
                if ids.len() > MAX_IDS {
                    return Err(Fail(ErrorCode::BadRequest, format!("more than {MAX_IDS} ids")));
                }
                let state = self.state.clone();
                let missing = blocking(move || {
                    let guard = state.sessions.enter(session, &host)?;
                    if guard.claim_parent() {
                        prove_parent(store.as_ref(), &guard);
                    }
                    // Only what the session has not proven needs the store.
                    let unknown = guard.untouched_at(&ids);
                    let asked: Vec<ChunkId> = unknown.iter().map(|&i| ids[i]).collect();
                    let have = store.host_has(&host, &asked)?;
                    // What the push is told is stored, a sweep must spare.
                    guard.touch(asked.iter().zip(&have).filter(|(_, h)| **h).map(|(id, _)| *id));
                    Ok::<_, Fail>(unknown.iter().zip(&have).filter(|(_, h)| !**h).map(|(&i, _)| i as u32).collect())
                })
                .await??;
                Response::Missing(missing)
            }
            Request::PutChunk { session, id, blob } => {
                self.require(&[Role::Push, Role::Admin])?;
                return self.upload(session, id, blob, send, recv).await;
            }
            Request::Commit { session, tree } => {
                self.require(&[Role::Push, Role::Admin])?;
                let client = self.client.clone();
                let state = self.state.clone();
                let result = blocking(move || {
                    let guard = state.sessions.enter(session, &host)?;
                    let kind = guard.info.kind;
                    let max = state.config.max_pushes_per_day;
                    let stats = check_tree(store.as_ref(), &host, kind, &tree, &mut &guard)
                        .and_then(|s| push_budget(store.as_ref(), max, &host, &guard.info.name, now_ns()).map(|()| s))
                        .map_err(|e| match e {
                            CommitError::Rejected(m) => Fail(ErrorCode::Rejected, m),
                            CommitError::Store(s) => s.into(),
                        })?;
                    let name = guard.info.name.clone();
                    let snap = Snapshot { host, name, time_ns: now_ns(), kind, stats, tree, client };
                    let summary = store.commit_snapshot(&snap)?;
                    guard.finish();
                    Ok::<_, Fail>(summary)
                })
                .await
                .and_then(|r| r);
                let c = &self.state.monitor.counters;
                match &result {
                    Ok(s) => {
                        Counters::add(&c.pushes_ok, 1);
                        Counters::add(&c.read_bytes, s.stats.bytes);
                        // Freshness alerts clear as soon as the backup lands.
                        self.state.monitor.committed();
                    }
                    Err(_) => Counters::add(&c.pushes_failed, 1),
                }
                let summary = result?;
                info!(host = %self.host, name = %summary.name, id = %summary.id.short(), "snapshot committed");
                Response::Committed(summary)
            }
            Request::ListSnapshots { host: want, name } => {
                let filter = match (self.role, want) {
                    (Role::Admin, w) => w,
                    (_, Some(w)) if w != self.host => {
                        return Err(Fail(ErrorCode::Forbidden, "only an admin token lists other hosts".into()))
                    }
                    _ => Some(self.host.clone()),
                };
                Response::Snapshots(blocking(move || store.list_snapshots(filter.as_deref(), name.as_deref())).await??)
            }
            Request::GetSnapshot { id } => {
                let snap = blocking(move || store.snapshot(&id)).await??;
                match snap {
                    // Another host's snapshot is reported as absent, not forbidden.
                    Some(s) if self.role == Role::Admin || s.host == self.host => {
                        Response::Snapshot { id, snapshot: s }
                    }
                    _ => return Err(Fail(ErrorCode::NotFound, format!("no snapshot {}", id.short()))),
                }
            }
            Request::GetChunks { ids } => return self.fetch(ids, send).await,
            Request::Forget { id } => {
                self.require(&[Role::Admin])?;
                if !blocking(move || store.delete_snapshot(&id)).await?? {
                    return Err(Fail(ErrorCode::NotFound, format!("no snapshot {}", id.short())));
                }
                info!(host = %self.host, id = %id.short(), "snapshot forgotten");
                Response::Done
            }
            Request::Protect { id, protected } => {
                self.require(&[Role::Admin])?;
                if !blocking(move || store.set_protected(&id, protected)).await?? {
                    return Err(Fail(ErrorCode::NotFound, format!("no snapshot {}", id.short())));
                }
                Response::Done
            }
        };
        write_frame(send, &resp).await?;
        Ok(())
    }

    /// An upload stream: PutChunk frames until the client finishes it.
    async fn upload(
        &self,
        session: u64,
        first_id: ChunkId,
        first_blob: Vec<u8>,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Reply {
        // Refuse a stream for a dead session before decompressing anything.
        let (state, host) = (self.state.clone(), self.host.clone());
        blocking(move || state.sessions.enter(session, &host).map(drop)).await??;
        let mut next = Some((first_id, first_blob));
        let (mut chunks, mut bytes) = (0u32, 0u64);
        let mut batch: Vec<(ChunkId, Vec<u8>)> = Vec::with_capacity(PUT_BATCH);
        let mut batch_bytes = 0usize;
        loop {
            let done = next.is_none();
            if let Some(c) = next.take() {
                batch_bytes += c.1.len();
                batch.push(c);
            }
            if batch.len() >= PUT_BATCH || batch_bytes >= PUT_BATCH_BYTES || (done && !batch.is_empty()) {
                batch_bytes = 0;
                let state = self.state.clone();
                let host = self.host.clone();
                let items = std::mem::take(&mut batch);
                let n = items.len() as u32;
                let received: u64 = items.iter().map(|(_, b)| b.len() as u64).sum();
                // Decompress and re-hash every chunk before it is stored.
                let stats = blocking(move || {
                    let verified = items
                        .into_iter()
                        .map(|(id, b)| {
                            VerifiedChunk::verify(id, b)
                                .map_err(|e| Fail(ErrorCode::Rejected, format!("chunk {} refused: {e}", id.short())))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let guard = state.sessions.enter(session, &host)?;
                    let stats = state.store.put_chunks(&host, &verified)?;
                    guard.touch(verified.iter().map(|c| *c.id()));
                    Ok::<_, Fail>(stats)
                })
                .await??;
                chunks += n;
                let c = &self.state.monitor.counters;
                Counters::add(&c.uploaded_bytes, received);
                Counters::add(&c.new_bytes, stats.new_bytes);
                // What the store newly kept stays on the server: telling
                // the uploader would reveal that another host holds the
                // same content.
                debug!(host = %self.host, new = stats.new_chunks, bytes = stats.new_bytes, "chunks stored");
                bytes += received;
            }
            if done {
                break;
            }
            match read_frame::<Request, _>(recv).await? {
                None => {}
                Some(Request::PutChunk { session: s, id, blob }) if s == session => next = Some((id, blob)),
                Some(_) => return Err(Fail(ErrorCode::BadRequest, "only chunks may follow a chunk".into())),
            }
        }
        write_frame(send, &Response::PutOk { chunks, bytes }).await?;
        Ok(())
    }

    async fn fetch(&self, ids: Vec<ChunkId>, send: &mut SendStream) -> Reply {
        self.require(&[Role::Push, Role::Restore, Role::Admin])?;
        if ids.len() > MAX_FETCH {
            return Err(Fail(ErrorCode::BadRequest, format!("more than {MAX_FETCH} chunks in one request")));
        }
        if self.role != Role::Admin {
            // Possession only: a chunk that is no longer stored is found
            // missing by the read below (one lookup per chunk fewer).
            let (store, host, q) = (self.state.store.clone(), self.host.clone(), ids.clone());
            let held = blocking(move || store.host_holds(&host, &q)).await??;
            if let Some(i) = held.iter().position(|h| !h) {
                return Err(Fail(ErrorCode::NotFound, format!("no chunk {} for this host", ids[i].short())));
            }
        }
        let mut next = 0;
        while next < ids.len() {
            // Blobs are read about 1 MiB at a time per blocking task: a
            // task per small chunk cost more than reading it.
            let (store, want) = (self.state.store.clone(), ids[next..].to_vec());
            let blobs = blocking(move || {
                let (mut out, mut bytes) = (Vec::new(), 0);
                for id in want {
                    let blob = store.chunk_blob(&id)?;
                    bytes += blob.as_ref().map_or(0, Vec::len);
                    let stop = blob.is_none() || bytes >= FETCH_READ_BYTES;
                    out.push(blob);
                    if stop {
                        break;
                    }
                }
                Ok::<_, StoreError>(out)
            })
            .await??;
            for blob in blobs {
                let id = ids[next];
                let blob = blob.ok_or_else(|| {
                    Fail(ErrorCode::NotFound, format!("chunk {} is missing from the store; run verify", id.short()))
                })?;
                write_frame(send, &Response::Chunk { id, blob }).await?;
                next += 1;
            }
        }
        Ok(())
    }
}
