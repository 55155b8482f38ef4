//! One client connection: the hello handshake, then one task per stream.
//! Everything here treats the peer as hostile: lengths are capped by the
//! frame reader, every request is checked against the token's role and
//! host, and errors go back on the stream instead of ending the server.

use std::sync::Arc;
use std::time::Duration;

use bkp_common::blob;
use bkp_common::io::{read_body, read_len, write_frame, Admitted, Budget, IoError};
use bkp_common::names::check_set_name;
use bkp_common::protocol::{ErrorCode, Request, Response, Role, MAGIC, MAX_FRAME, MAX_IDS, VERSION};
use bkp_common::snapshot::Snapshot;
use bkp_common::ChunkId;
use quinn::{RecvStream, SendStream};
use tracing::{debug, info, warn};

use crate::audit::Event;
use crate::commit::{check_tree, parent_refs, push_budget, CommitError};
use crate::jobs::now_ns;
use crate::limits::{AuthSlot, PendingSlot, TokenShared, CLOSE_CROWDED, CLOSE_REFUSED, CROWDED_REASON, SMALL_WINDOW};
use crate::monitor::Counters;
use crate::server::ServerState;
use crate::sessions::SessionError;
use crate::store::{StoreError, VerifiedChunk};

/// From the first packet to an accepted hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_MAX: usize = 4096;
/// A frame must arrive in full this soon after its length did; until
/// then it holds its budget.
const FRAME_DEADLINE: Duration = Duration::from_secs(30);
/// An upload stream silent this long between frames stores what it holds.
const BATCH_IDLE: Duration = Duration::from_secs(1);
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
    token_id: String,
    token: Arc<TokenShared>,
    peer: std::net::SocketAddr,
    /// This connection's frame budget (see `crate::limits`).
    frames: Arc<Budget>,
}

/// An error that goes back to the client on the stream it came from.
struct Fail(ErrorCode, String);

type Reply = Result<(), Fail>;

/// The detail (paths, RocksDB's words) stays in the server's log.
impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        if let StoreError::Protected(_) = e {
            return Fail(ErrorCode::Rejected, e.to_string());
        }
        warn!("store error: {e}");
        match e {
            StoreError::Full(_) => Fail(ErrorCode::Internal, e.to_string()),
            _ => Fail(ErrorCode::Internal, "server storage error (see the server log)".into()),
        }
    }
}

impl From<SessionError> for Fail {
    fn from(e: SessionError) -> Self {
        let code = match e {
            SessionError::HostBusy(..) | SessionError::ServerBusy(_) => ErrorCode::Busy,
            _ => ErrorCode::Rejected,
        };
        Fail(code, e.to_string())
    }
}

impl From<IoError> for Fail {
    fn from(e: IoError) -> Self {
        Fail(ErrorCode::BadRequest, e.to_string())
    }
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

/// Handshake and hello, then the connection's streams. `slot` is its
/// unauthenticated slot: when the pool needs it for a newcomer, the
/// connection is closed; it is given up once the hello is accepted.
pub async fn handle(incoming: quinn::Incoming, state: Arc<ServerState>, slot: PendingSlot) {
    let remote = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
    };
    // The handshake is inside the hello deadline too: a peer that starts
    // one and stalls would otherwise hold its slot for the idle timeout.
    let conn = tokio::select! {
        _ = slot.evict.notified() => {
            debug!(%remote, "handshake dropped to make room for a newer connection");
            return;
        }
        c = tokio::time::timeout_at(deadline, connecting) => match c {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(%remote, "handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%remote, "handshake timed out");
                return;
            }
        },
    };
    let (ctx, _auth) = tokio::select! {
        _ = slot.evict.notified() => {
            debug!(%remote, "no hello yet; closed to make room for a newer connection");
            conn.close(CLOSE_CROWDED.into(), CROWDED_REASON.as_bytes());
            return;
        }
        h = tokio::time::timeout_at(deadline, hello(&conn, state)) => match h {
            Ok(Ok((ctx, auth))) => (Arc::new(ctx), auth),
            Ok(Err(msg)) => {
                info!(%remote, "refused: {msg}");
                conn.close(CLOSE_REFUSED.into(), b"refused");
                return;
            }
            Err(_) => {
                conn.close(CLOSE_REFUSED.into(), b"no hello within 10s");
                return;
            }
        },
    };
    drop(slot);
    info!(%remote, host = %ctx.host, role = ctx.role.as_str(), token = %ctx.token_id, "connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { ctx.stream(send, recv).await });
            }
            Err(e) => {
                debug!(%remote, frames_peak = ctx.frames.peak(), "connection ended: {e}");
                break;
            }
        }
    }
}

/// Sends a refusal on the hello stream and lets it reach the client
/// before the connection is closed. The rest of the hello is refused
/// first: a client still writing an oversized one then stops and reads.
async fn refuse_hello(send: &mut SendStream, recv: &mut RecvStream, code: ErrorCode, message: String) -> String {
    let _ = recv.stop(0u32.into());
    let _ = write_frame(send, &Response::Error { code, message: message.clone() }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    message
}

async fn hello(conn: &quinn::Connection, state: Arc<ServerState>) -> Result<(Conn, AuthSlot), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    // Unauthenticated peers get a small frame budget; the length is read
    // first so an oversized hello is refused in words.
    let len = match read_len(&mut recv, MAX_FRAME).await {
        Ok(Some(len)) if len <= HELLO_MAX => len,
        Ok(Some(len)) => {
            let msg = format!(
                "hello of {len} bytes is over the server's {HELLO_MAX}-byte limit; the token file must hold \
                 only the token that `bkp-server token create` printed"
            );
            return Err(refuse_hello(&mut send, &mut recv, ErrorCode::BadRequest, msg).await);
        }
        Ok(None) => return Err("stream ended before the hello".into()),
        Err(e) => {
            return Err(refuse_hello(&mut send, &mut recv, ErrorCode::BadRequest, format!("bad hello: {e}")).await)
        }
    };
    let req: Request = read_body(&mut recv, len, HELLO_TIMEOUT).await.map_err(|e| e.to_string())?;
    let (token, client) = match req {
        Request::Hello { magic, version, token, client } if magic == MAGIC && version == VERSION => (token, client),
        Request::Hello { version, .. } => {
            let msg = format!("protocol version {version} not supported (server speaks {VERSION}); upgrade bkp");
            return Err(refuse_hello(&mut send, &mut recv, ErrorCode::BadRequest, msg).await);
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
        state.audit.record(
            crate::audit::Line::new(crate::audit::Event::HelloRefused, "refused")
                .peer(conn.remote_address())
                .detail("unknown or revoked token"),
        );
        return Err(refuse_hello(&mut send, &mut recv, ErrorCode::Unauthorized, msg).await);
    };
    let mut auth = match state.limits.admit(&rec.id, &rec.host, conn) {
        Ok(a) => a,
        Err(msg) => return Err(refuse_hello(&mut send, &mut recv, ErrorCode::Busy, msg).await),
    };
    // Authenticated: the shared transport's streams and window. A restore
    // token only sends requests, so it keeps a small window.
    let window = match rec.role {
        Role::Restore => SMALL_WINDOW,
        _ => auth.take_window(bkp_common::quic::RECEIVE_WINDOW),
    };
    conn.set_receive_window(window.into());
    conn.set_max_concurrent_bi_streams(bkp_common::quic::MAX_STREAMS.into());
    let welcome = Response::Welcome { host: rec.host.clone(), role: rec.role, server: bkp_common::VERSION.to_string() };
    write_frame(&mut send, &welcome).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let ctx = Conn {
        frames: state.limits.connection_budget(),
        token: auth.shared.clone(),
        token_id: rec.id,
        peer: conn.remote_address(),
        state,
        host: rec.host,
        role: rec.role,
        client,
    };
    Ok((ctx, auth))
}

impl Conn {
    async fn stream(self: Arc<Self>, mut send: SendStream, mut recv: RecvStream) {
        let result = match self.next_request(&mut recv).await {
            Ok(Some((req, admitted))) => self.dispatch(req, admitted, &mut send, &mut recv).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(Fail(code, message)) = result {
            debug!(host = %self.host, "request failed: {message}");
            let _ = write_frame(&mut send, &Response::Error { code, message }).await;
            let _ = recv.stop(0u32.into());
        }
        let _ = send.finish();
    }

    /// The frame budgets a request is admitted against, innermost first.
    fn budgets(&self) -> [&Arc<Budget>; 3] {
        [&self.frames, &self.token.frames, &self.state.limits.frames]
    }

    /// The next request on a stream, its length admitted against the
    /// budgets before its body is allocated; `None` at a clean end.
    async fn next_request(&self, recv: &mut RecvStream) -> Result<Option<(Request, Admitted)>, Fail> {
        let Some(len) = read_len(recv, MAX_FRAME).await? else { return Ok(None) };
        let admitted = Budget::admit(&self.budgets(), len).await;
        Ok(Some((read_body::<Request, _>(recv, len, FRAME_DEADLINE).await?, admitted)))
    }

    fn require(&self, allowed: &[Role], what: &str) -> Reply {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            self.refused(&format!("{what}: a {} token may not do this", self.role.as_str()));
            Err(Fail(ErrorCode::Forbidden, format!("a {} token may not do this", self.role.as_str())))
        }
    }

    /// An audit line about this connection's token.
    fn audit(&self, event: crate::audit::Event, result: &str) -> crate::audit::Line {
        crate::audit::Line::new(event, result).token(&self.token_id).host(&self.host).peer(self.peer)
    }

    /// Audits a forget or protect: `done` is whether the snapshot existed.
    fn admin_done(&self, event: Event, id: &bkp_common::SnapshotId, done: &Result<bool, StoreError>) {
        let result = match done {
            Ok(true) => "ok",
            Ok(false) => "not_found",
            Err(_) => "failed",
        };
        self.state.audit.record(self.audit(event, result).detail(format!("snapshot {id}")));
    }

    fn refused(&self, detail: &str) {
        self.state.audit.record(self.audit(crate::audit::Event::Refused, "refused").detail(detail));
    }

    /// Answers one request; `admitted` is its frame's budget, held until
    /// the request is done with it.
    async fn dispatch(&self, req: Request, admitted: Admitted, send: &mut SendStream, recv: &mut RecvStream) -> Reply {
        let store = self.state.store.clone();
        let host = self.host.clone();
        let resp = match req {
            Request::Hello { .. } => return Err(Fail(ErrorCode::BadRequest, "hello sent twice".into())),
            Request::StartPush { name, kind } => {
                self.require(&[Role::Push, Role::Admin], "start_push")?;
                check_set_name(&name).map_err(|e| Fail(ErrorCode::BadRequest, e.to_string()))?;
                let (state, token) = (self.state.clone(), self.token_id.clone());
                let session = blocking(move || state.sessions.start_for(&token, &host, &name, kind)).await??;
                Response::PushStarted { session }
            }
            Request::HasChunks { session, ids } => {
                self.require(&[Role::Push, Role::Admin], "has_chunks")?;
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
                self.require(&[Role::Push, Role::Admin], "put_chunk")?;
                return self.upload(session, (id, blob, admitted), send, recv).await;
            }
            Request::Commit { session, tree } => {
                self.require(&[Role::Push, Role::Admin], "commit")?;
                let client = self.client.clone();
                let state = self.state.clone();
                // The set, for the per-set counters, once the session is known.
                let set = Arc::new(std::sync::Mutex::new(String::new()));
                let set_in = set.clone();
                let result = blocking(move || {
                    let guard = state.sessions.enter(session, &host)?;
                    set_in.lock().expect("set name").clone_from(&guard.info.name);
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
                    guard.still_live()?;
                    let summary = store.commit_snapshot(&snap)?;
                    guard.finish();
                    Ok::<_, Fail>(summary)
                })
                .await
                .and_then(|r| r);
                let c = &self.state.monitor.counters;
                let set = std::mem::take(&mut *set.lock().expect("set name"));
                c.push_done(&self.host, &set, result.is_ok());
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
                        self.refused(&format!("list_snapshots of host {w}: only an admin token lists other hosts"));
                        return Err(Fail(ErrorCode::Forbidden, "only an admin token lists other hosts".into()));
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
                self.require(&[Role::Admin], "forget")?;
                let done = blocking(move || store.delete_snapshot(&id)).await?;
                self.admin_done(Event::Forget, &id, &done);
                if !done? {
                    return Err(Fail(ErrorCode::NotFound, format!("no snapshot {}", id.short())));
                }
                info!(host = %self.host, id = %id.short(), "snapshot forgotten");
                Response::Done
            }
            Request::Protect { id, protected } => {
                self.require(&[Role::Admin], "protect")?;
                let done = blocking(move || store.set_protected(&id, protected)).await?;
                self.admin_done(if protected { Event::Protect } else { Event::Unprotect }, &id, &done);
                if !done? {
                    return Err(Fail(ErrorCode::NotFound, format!("no snapshot {}", id.short())));
                }
                Response::Done
            }
            Request::PushFailed { name, kind, reason } => {
                self.require(&[Role::Push, Role::Admin], "push_failed")?;
                let state = self.state.clone();
                blocking(move || crate::push_failures::report(&state, &host, &name, kind, &reason, now_ns()))
                    .await?
                    .map_err(|m| Fail(ErrorCode::BadRequest, m))?;
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
        first: (ChunkId, Vec<u8>, Admitted),
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Reply {
        // Refuse a stream for a dead session before decompressing anything.
        let (state, host) = (self.state.clone(), self.host.clone());
        blocking(move || state.sessions.enter(session, &host).map(drop)).await??;
        let (mut chunks, mut bytes) = (0u32, 0u64);
        let mut batch = Batch::default();
        batch.push(first);
        loop {
            if batch.items.len() >= PUT_BATCH || batch.bytes >= PUT_BATCH_BYTES {
                let (n, b) = self.store_batch(session, std::mem::take(&mut batch)).await?;
                (chunks, bytes) = (chunks + n, bytes + b);
            }
            // A stream that goes quiet holding part of a batch stores it
            // rather than keep its budget until its next frame.
            let len = {
                let next = read_len(&mut *recv, MAX_FRAME);
                tokio::pin!(next);
                if batch.items.is_empty() {
                    next.await?
                } else {
                    tokio::select! {
                        len = &mut next => len?,
                        _ = tokio::time::sleep(BATCH_IDLE) => {
                            let (n, b) = self.store_batch(session, std::mem::take(&mut batch)).await?;
                            (chunks, bytes) = (chunks + n, bytes + b);
                            next.await?
                        }
                    }
                }
            };
            let Some(len) = len else { break };
            let admitted = match Budget::try_admit(&self.budgets(), len) {
                Some(a) => a,
                None => {
                    // Streams that all waited for budget while holding
                    // part of a batch would wait for each other: the
                    // batch is stored (and its budget freed) first.
                    if !batch.items.is_empty() {
                        let (n, b) = self.store_batch(session, std::mem::take(&mut batch)).await?;
                        (chunks, bytes) = (chunks + n, bytes + b);
                    }
                    Budget::admit(&self.budgets(), len).await
                }
            };
            match read_body::<Request, _>(recv, len, FRAME_DEADLINE).await? {
                Request::PutChunk { session: s, id, blob } if s == session => batch.push((id, blob, admitted)),
                _ => return Err(Fail(ErrorCode::BadRequest, "only chunks may follow a chunk".into())),
            }
        }
        if !batch.items.is_empty() {
            let (n, b) = self.store_batch(session, batch).await?;
            (chunks, bytes) = (chunks + n, bytes + b);
        }
        write_frame(send, &Response::PutOk { chunks, bytes }).await?;
        Ok(())
    }

    /// Verifies and stores one batch; returns its chunks and blob bytes.
    async fn store_batch(&self, session: u64, batch: Batch) -> Result<(u32, u64), Fail> {
        let Batch { items, bytes: received, admitted } = batch;
        let n = items.len() as u32;
        // Decompression is the costly part of a batch and the blob header
        // says its size: a batch that inflates far beyond its bytes (a
        // zstd bomb in all but name) waits its turn on the token's pace.
        let raw: u64 = items.iter().map(|(_, b)| blob::header(b).map_or(0, |h| h.raw_len as u64)).sum();
        let delay = self.token.inflate_delay(received as u64, raw);
        if !delay.is_zero() {
            debug!(host = %self.host, raw, received, ms = delay.as_millis() as u64, "upload batch paced");
            tokio::time::sleep(delay).await;
        }
        let (state, host) = (self.state.clone(), self.host.clone());
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
        drop(admitted);
        let c = &self.state.monitor.counters;
        Counters::add(&c.uploaded_bytes, received as u64);
        Counters::add(&c.new_bytes, stats.new_bytes);
        // What the store newly kept stays on the server: telling the
        // uploader would reveal that another host holds the same content.
        debug!(host = %self.host, new = stats.new_chunks, bytes = stats.new_bytes, "chunks stored");
        Ok((n, received as u64))
    }

    async fn fetch(&self, ids: Vec<ChunkId>, send: &mut SendStream) -> Reply {
        self.require(&[Role::Push, Role::Restore, Role::Admin], "get_chunks")?;
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

/// Chunks received on an upload stream and not yet stored, with the
/// budget their frames were admitted against.
#[derive(Default)]
struct Batch {
    items: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
    admitted: Vec<Admitted>,
}

impl Batch {
    fn push(&mut self, (id, blob, admitted): (ChunkId, Vec<u8>, Admitted)) {
        self.bytes += blob.len();
        self.items.push((id, blob));
        self.admitted.push(admitted);
    }
}
