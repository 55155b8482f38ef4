//! One client connection: the hello handshake, then one task per stream,
//! which turns its request frames into calls of `crate::service` (where
//! every request is checked against the token's role and host) and the
//! answers back into frames. Everything here treats the peer as hostile:
//! lengths are capped by the frame reader, frames are admitted against
//! memory budgets before they are read, uploads are batched and paced,
//! and errors go back on the stream instead of ending the server.

use std::sync::Arc;
use std::time::Duration;

use bkp_common::blob;
use bkp_common::io::{read_body, read_len, write_frame, Admitted, Budget, IoError};
use bkp_common::names::escape;
use bkp_common::protocol::{ErrorCode, Request, Response, Role, MAGIC, MAX_FRAME, VERSION};
use bkp_common::snapshot::Incomplete;
use bkp_common::ChunkId;
use quinn::{RecvStream, SendStream};
use tracing::{debug, info, warn};

use crate::audit::{Event, Line};
use crate::clock::now_ns;
use crate::limits::{AuthSlot, PendingSlot, TokenShared, CLOSE_CROWDED, CLOSE_REFUSED, CROWDED_REASON, SMALL_WINDOW};
use crate::monitor::Counters;
use crate::service::{admin, push, read, Caller, ServiceError};
use crate::sessions::SessionError;
use crate::state::ServerState;
use crate::store::StoreError;

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
/// Blob bytes read per blocking task while answering GetChunks, at least
/// (the backend may ask for more: an object store reads a batch with many
/// GETs in flight).
const FETCH_READ_BYTES: usize = 1 << 20;

struct Conn {
    state: Arc<ServerState>,
    caller: Arc<Caller>,
    token: Arc<TokenShared>,
    peer: std::net::SocketAddr,
    /// This connection's frame budget (see `crate::limits`).
    frames: Arc<Budget>,
}

/// An error that goes back to the client on the stream it came from.
struct Fail(ErrorCode, String);

type Reply = Result<(), Fail>;

impl From<IoError> for Fail {
    fn from(e: IoError) -> Self {
        Fail(ErrorCode::BadRequest, e.to_string())
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
        h = tokio::time::timeout_at(deadline, hello(&conn, state.clone())) => match h {
            Ok(Ok((ctx, auth))) => (Arc::new(ctx), auth),
            Ok(Err(msg)) => {
                info!(%remote, "refused: {msg}");
                conn.close(CLOSE_REFUSED.into(), b"refused");
                return;
            }
            Err(_) => {
                audit_hello(&state, remote, "no hello within 10s");
                conn.close(CLOSE_REFUSED.into(), b"no hello within 10s");
                return;
            }
        },
    };
    drop(slot);
    info!(%remote, host = %ctx.caller.host, role = ctx.caller.role.as_str(), token = %ctx.caller.token_id, "connected");
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

/// A hello refused before any token was accepted (or over a limit): the
/// audit log's rate limit keeps a flood of these from filling the disk.
fn audit_hello(state: &ServerState, peer: std::net::SocketAddr, why: &str) {
    state.audit().record(Line::new(Event::HelloRefused, "refused").peer(peer).detail(why));
}

/// Audits a refused hello, sends the refusal on the hello stream and lets
/// it reach the client before the connection is closed. The rest of the
/// hello is refused first: a client still writing an oversized one then
/// stops and reads.
async fn refuse_hello(
    (state, conn): (&ServerState, &quinn::Connection),
    send: &mut SendStream,
    recv: &mut RecvStream,
    code: ErrorCode,
    message: String,
) -> String {
    audit_hello(state, conn.remote_address(), &message);
    let _ = recv.stop(0u32.into());
    let _ = write_frame(send, &Response::Error { code, message: message.clone() }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    message
}

/// Why a connection ended at its hello (logged; the connection closes).
#[derive(Debug, thiserror::Error)]
enum HelloError {
    /// Refused; the client was told why and the refusal audited.
    #[error("{0}")]
    Refused(String),
    /// The peer left or the transport failed before the hello was done
    /// (the client's next try may well pass).
    #[error("{0}")]
    Transport(String),
    /// The server could not check the token (its token file): logged for
    /// the operator, and the client sees a closed connection.
    #[error("checking the token: {0}")]
    Tokens(String),
}

async fn hello(conn: &quinn::Connection, state: Arc<ServerState>) -> Result<(Conn, AuthSlot), HelloError> {
    let refused = HelloError::Refused;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| HelloError::Transport(e.to_string()))?;
    let at = (state.as_ref(), conn);
    // Unauthenticated peers get a small frame budget; the length is read
    // first so an oversized hello is refused in words.
    let len = match read_len(&mut recv, MAX_FRAME).await {
        Ok(Some(len)) if len <= HELLO_MAX => len,
        Ok(Some(len)) => {
            let msg = format!(
                "hello of {len} bytes is over the server's {HELLO_MAX}-byte limit; the token file must hold \
                 only the token that `bkp-server token create` printed"
            );
            return Err(refused(refuse_hello(at, &mut send, &mut recv, ErrorCode::BadRequest, msg).await));
        }
        Ok(None) => {
            audit_hello(&state, conn.remote_address(), "stream ended before the hello");
            return Err(HelloError::Transport("stream ended before the hello".into()));
        }
        Err(e) => {
            return Err(refused(
                refuse_hello(at, &mut send, &mut recv, ErrorCode::BadRequest, format!("bad hello: {e}")).await,
            ))
        }
    };
    let req: Request = match read_body(&mut recv, len, HELLO_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => {
            return Err(refused(
                refuse_hello(at, &mut send, &mut recv, ErrorCode::BadRequest, format!("bad hello: {e}")).await,
            ))
        }
    };
    let (token, client) = match req {
        Request::Hello { magic, version, token, client } if magic == MAGIC && version == VERSION => (token, client),
        Request::Hello { version, .. } => {
            let msg = format!("protocol version {version} not supported (server speaks {VERSION}); upgrade bkp");
            return Err(refused(refuse_hello(at, &mut send, &mut recv, ErrorCode::BadRequest, msg).await));
        }
        _ => {
            let msg = "the first request must be a hello".to_string();
            return Err(refused(refuse_hello(at, &mut send, &mut recv, ErrorCode::BadRequest, msg).await));
        }
    };
    let tokens = state.tokens();
    let rec = tokio::task::spawn_blocking(move || tokens.authenticate(&token))
        .await
        .map_err(|e| HelloError::Tokens(e.to_string()))?
        .map_err(|e| HelloError::Tokens(e.to_string()))?;
    let Some(rec) = rec else {
        let msg = "unknown or revoked token; ask the operator for a token (bkp-server token create)".to_string();
        return Err(refused(refuse_hello(at, &mut send, &mut recv, ErrorCode::Unauthorized, msg).await));
    };
    let mut auth = match state.limits().admit(&rec.id, &rec.host, conn) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.retryable() { ErrorCode::Busy } else { ErrorCode::Unauthorized };
            return Err(refused(refuse_hello(at, &mut send, &mut recv, code, e.to_string()).await));
        }
    };
    // Authenticated: the shared transport's streams and window. A restore
    // or sync token only sends requests, so it keeps a small window.
    let window = match rec.role {
        Role::Restore | Role::Sync => SMALL_WINDOW,
        _ => auth.take_window(bkp_common::quic::RECEIVE_WINDOW),
    };
    conn.set_receive_window(window.into());
    conn.set_max_concurrent_bi_streams(bkp_common::quic::MAX_STREAMS.into());
    let welcome = Response::Welcome { host: rec.host.clone(), role: rec.role, server: bkp_common::VERSION.to_string() };
    write_frame(&mut send, &welcome).await.map_err(|e| HelloError::Transport(e.to_string()))?;
    let _ = send.finish();
    let ctx = Conn {
        frames: state.limits().connection_budget(),
        token: auth.shared.clone(),
        peer: conn.remote_address(),
        state,
        caller: Arc::new(Caller { host: rec.host, role: rec.role, token_id: rec.id, client }),
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
            debug!(host = %self.caller.host, "request failed: {message}");
            let _ = write_frame(&mut send, &Response::Error { code, message }).await;
            let _ = recv.stop(0u32.into());
        }
        let _ = send.finish();
    }

    /// The frame budgets a request is admitted against, innermost first.
    fn budgets(&self) -> [&Arc<Budget>; 3] {
        [&self.frames, &self.token.frames, &self.state.limits().frames]
    }

    /// The next request on a stream, its length admitted against the
    /// budgets before its body is allocated; `None` at a clean end.
    async fn next_request(&self, recv: &mut RecvStream) -> Result<Option<(Request, Admitted)>, Fail> {
        let Some(len) = read_len(recv, MAX_FRAME).await? else { return Ok(None) };
        let admitted = Budget::admit(&self.budgets(), len).await;
        Ok(Some((read_body::<Request, _>(recv, len, FRAME_DEADLINE).await?, admitted)))
    }

    /// The wire form of a service error. Refusals by role or host are
    /// audited; a storage error's detail goes to the log only.
    fn fail(&self, e: ServiceError) -> Fail {
        match &e {
            ServiceError::Forbidden { audit, .. } => self.refused(audit),
            ServiceError::Session(SessionError::OtherHost { owner }) => {
                self.refused(&format!("push session of host {owner} used by this token"))
            }
            ServiceError::Store(StoreError::Protected(_)) => {}
            ServiceError::Store(s) => warn!("store error: {s}"),
            _ => {}
        }
        Fail(e.code(), e.client_message())
    }

    /// Runs a service call on a blocking thread.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ServerState, &Caller) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, Fail> {
        let (state, caller) = (self.state.clone(), self.caller.clone());
        blocking(move || f(&state, &caller)).await?.map_err(|e| self.fail(e))
    }

    /// An audit line about this connection's token.
    fn audit(&self, event: crate::audit::Event, result: &str) -> crate::audit::Line {
        crate::audit::Line::new(event, result).token(&self.caller.token_id).host(&self.caller.host).peer(self.peer)
    }

    /// Audits a forget or protect that the caller's role allowed.
    fn admin_done(&self, event: Event, id: &bkp_common::SnapshotId, done: &Result<(), Fail>) {
        let result = match done {
            Ok(()) => "ok",
            Err(Fail(ErrorCode::Forbidden, _)) => return,
            Err(Fail(ErrorCode::NotFound, _)) => "not_found",
            Err(_) => "failed",
        };
        self.state.audit().record(self.audit(event, result).detail(format!("snapshot {id}")));
    }

    fn refused(&self, detail: &str) {
        self.state.audit().record(self.audit(crate::audit::Event::Refused, "refused").detail(detail));
    }

    /// Answers one request; `admitted` is its frame's budget, held until
    /// the request is done with it.
    async fn dispatch(&self, req: Request, admitted: Admitted, send: &mut SendStream, recv: &mut RecvStream) -> Reply {
        let resp = match req {
            Request::Hello { .. } => return Err(Fail(ErrorCode::BadRequest, "hello sent twice".into())),
            Request::StartPush { name, kind } => {
                let session = self.call(move |st, c| push::start(st.sessions(), c, &name, kind)).await?;
                Response::PushStarted { session }
            }
            Request::HasChunks { session, ids } => Response::Missing(
                self.call(move |st, c| push::has_chunks(st.store().as_ref(), st.sessions(), c, session, &ids)).await?,
            ),
            Request::PutChunk { session, id, blob } => {
                return self.upload(session, (id, blob, admitted), send, recv).await;
            }
            Request::Commit { session, tree } => self.commit(session, tree, None).await?,
            Request::CommitIncomplete { session, tree, incomplete } => {
                self.commit(session, tree, Some(incomplete)).await?
            }
            Request::ListSnapshots { host, name } => Response::Snapshots(
                self.call(move |st, c| read::list(st.store().as_ref(), c, host, name.as_deref()))
                    .await?
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Request::ListSnapshotsFull { host, name } => Response::SnapshotsFull(
                self.call(move |st, c| read::list(st.store().as_ref(), c, host, name.as_deref())).await?,
            ),
            Request::GetSnapshot { id } => {
                let snapshot = self.call(move |st, c| read::snapshot(st.store().as_ref(), c, &id)).await?;
                Response::Snapshot { id, snapshot }
            }
            Request::GetChunks { ids } => return self.fetch(ids, send).await,
            Request::Forget { id } => {
                let done = self.call(move |st, c| admin::forget(st.store().as_ref(), c, &id)).await;
                self.admin_done(Event::Forget, &id, &done);
                done?;
                info!(host = %self.caller.host, id = %id.short(), "snapshot forgotten");
                Response::Done
            }
            Request::Protect { id, protected } => {
                let done = self.call(move |st, c| admin::protect(st.store().as_ref(), c, &id, protected)).await;
                self.admin_done(if protected { Event::Protect } else { Event::Unprotect }, &id, &done);
                done?;
                Response::Done
            }
            Request::PushFailed { name, kind, reason } => {
                self.call(move |st, c| {
                    let failures = &st.monitor().push_failures;
                    admin::push_failed(failures, st.store().as_ref(), c, &name, kind, &reason, now_ns())
                })
                .await?;
                self.state.monitor().nudge.notify_one();
                Response::Done
            }
        };
        write_frame(send, &resp).await?;
        Ok(())
    }

    /// `Commit` and `CommitIncomplete`: counted per set, logged, and the
    /// monitor told.
    async fn commit(&self, session: u64, tree: Vec<ChunkId>, incomplete: Option<Incomplete>) -> Result<Response, Fail> {
        let max = self.state.config().max_pushes_per_day;
        let outcome = self
            .call(move |st, c| push::commit(st.store().as_ref(), st.sessions(), c, session, tree, incomplete, max))
            .await;
        // A task that failed is a failed commit of an unknown set.
        let (set, result) = match outcome {
            Ok(o) => (o.set, o.result.map_err(|e| self.fail(e))),
            Err(f @ Fail(ErrorCode::Forbidden, _)) => return Err(f),
            Err(f) => (String::new(), Err(f)),
        };
        let c = &self.state.monitor().counters;
        c.push_done(&self.caller.host, &set, result.is_ok());
        match &result {
            Ok(s) => {
                Counters::add(&c.pushes_ok, 1);
                Counters::add(&c.read_bytes, s.stats.bytes);
                // Freshness alerts clear as soon as the backup lands.
                self.state.monitor().committed();
            }
            Err(_) => Counters::add(&c.pushes_failed, 1),
        }
        let summary = result?;
        let (host, id) = (&self.caller.host, summary.id.short());
        match &summary.incomplete {
            None => info!(%host, name = %summary.name, %id, "snapshot committed"),
            // The paths come from the client: escaped.
            Some(i) => warn!(%host, name = %summary.name, %id, skipped = i.skipped,
                             first = %escape(i.paths.first().map_or("", String::as_str)),
                             "snapshot committed incomplete: files the client could not read are not in it"),
        }
        Ok(Response::Committed(summary.into()))
    }

    /// An upload stream: PutChunk frames until the client finishes it.
    async fn upload(
        &self,
        session: u64,
        first: (ChunkId, Vec<u8>, Admitted),
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Reply {
        self.call(move |st, c| push::open_upload(st.sessions(), c, session)).await?;
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

    /// Verifies and stores one batch (`service::push::put_batch`); returns
    /// its chunks and blob bytes.
    async fn store_batch(&self, session: u64, batch: Batch) -> Result<(u32, u64), Fail> {
        let Batch { items, bytes: received, admitted } = batch;
        let n = items.len() as u32;
        // Decompression is the costly part of a batch and the blob header
        // says its size: a batch that inflates far beyond its bytes (a
        // zstd bomb in all but name) waits its turn on the token's pace.
        let raw: u64 = items.iter().map(|(_, b)| blob::header(b).map_or(0, |h| h.raw_len as u64)).sum();
        let delay = self.token.inflate_delay(received as u64, raw);
        if !delay.is_zero() {
            debug!(host = %self.caller.host, raw, received, ms = delay.as_millis() as u64, "upload batch paced");
            tokio::time::sleep(delay).await;
        }
        let stats =
            self.call(move |st, c| push::put_batch(st.store().as_ref(), st.sessions(), c, session, items)).await?;
        drop(admitted);
        let c = &self.state.monitor().counters;
        Counters::add(&c.uploaded_bytes, received as u64);
        Counters::add(&c.new_bytes, stats.new_bytes);
        debug!(host = %self.caller.host, new = stats.new_chunks, bytes = stats.new_bytes, "chunks stored");
        Ok((n, received as u64))
    }

    async fn fetch(&self, ids: Vec<ChunkId>, send: &mut SendStream) -> Reply {
        let ids = Arc::new(ids);
        let q = ids.clone();
        self.call(move |st, c| read::authorize_fetch(st.store().as_ref(), c, &q)).await?;
        let mut next = 0;
        while next < ids.len() {
            // Blobs are read about 1 MiB at a time per blocking task: a
            // task per small chunk cost more than reading it.
            let q = ids.clone();
            let blobs = self
                .call(move |st, _| {
                    let max = st.store().read_batch_bytes().max(FETCH_READ_BYTES);
                    Ok(read::read_blobs(st.store().as_ref(), &q[next..], max)?)
                })
                .await?;
            for blob in blobs {
                let id = ids[next];
                let blob = blob.ok_or_else(|| self.fail(ServiceError::missing_chunk(&id)))?;
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
