//! A connection to the server: TLS with a pinned certificate (or a CA),
//! the hello handshake, and one method per request.
//!
//! Connecting retries a server that does not answer (down, restarting,
//! packets lost) with jittered backoff for the configured timeout
//! ([`DEFAULT_TIMEOUT`] unless `--timeout` or `timeout` in client.toml say
//! otherwise), each attempt bounded by [`ATTEMPT_TIMEOUT`]; a server that
//! answers and refuses (certificate, token, version) is not retried.
//!
//! A request that is safe to repeat is retried the same way when it fails
//! with an error that another try may cure ([`ClientError::retryable`]):
//! one that needs no push session (listing, reading a snapshot,
//! protecting) on a new connection if the old one was lost; a push's
//! queries and uploads on their own connection only while it is up (the
//! server is busy or had a storage hiccup), since a push session does not
//! outlive the server process that started it, and a push whose
//! connection was lost fails at once saying nothing was committed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bkp_common::io::{read_frame, write_frame};
use bkp_common::protocol::{ErrorCode, Request, Response, Role, ALPN, MAGIC, VERSION};
use bkp_common::snapshot::{Incomplete, Snapshot, SnapshotKind, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{ClientConfig, Trust};
use crate::error::{ClientError, LinkError, Result};

/// Accepts exactly one certificate, by SHA-256 of its DER bytes, and still
/// checks the handshake signature so the server must hold its key.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: String,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = hex::encode(Sha256::digest(end_entity.as_ref()));
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            // The pinned value is never shown: the peer that failed the
            // pin may be an impostor reading what its victim prints.
            Err(rustls::Error::General(format!(
                "the server's certificate does not match the pinned fingerprint (it presented {got}); \
                 if the server was re-initialised on purpose, pin its new fingerprint"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// How long `close` lets the endpoint flush the close frame.
const CLOSE_WAIT: Duration = Duration::from_millis(10);
pub use crate::config::DEFAULT_TIMEOUT;
/// [`Client::connect_within`]'s backoff: doubled from the first to the
/// cap, each wait drawn between half and all of it.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(8);
/// One handshake: on loopback or a LAN it takes milliseconds.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);

fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Connect("tls".into(), e.to_string()))?;
    let mut cfg = match trust {
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: fp.clone(),
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| ClientError::Connect(path.display().to_string(), e.to_string()))?;
            for c in certs {
                roots.add(c).map_err(|e| ClientError::Connect(path.display().to_string(), e.to_string()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The QUIC client configuration for `trust` (tests build raw
/// connections with it too).
pub fn quic_config(trust: &Trust) -> Result<quinn::ClientConfig> {
    let tls = tls_config(trust)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Connect("tls".into(), e.to_string()))?;
    let mut qcfg = quinn::ClientConfig::new(Arc::new(quic));
    qcfg.transport_config(Arc::new(bkp_common::quic::transport()));
    Ok(qcfg)
}

/// An authenticated connection (replaced by a new one when it is lost
/// under a request that may be repeated).
pub struct Client {
    link: std::sync::Mutex<Link>,
    /// Held while a lost link is replaced, so concurrent requests make one
    /// new connection between them.
    relink: tokio::sync::Mutex<()>,
    /// The address as configured (names the metadata cache).
    pub server: String,
    pub host: String,
    pub role: Role,
    /// Kept to connect again (to report a push the connection lost).
    cfg: ClientConfig,
    /// `--limit-upload`: chunk uploads wait for it (kept on reconnect).
    upload_limit: Option<Arc<bkp_common::rate::RateLimit>>,
    /// `connect_paced`'s receive window, for every link of this client.
    window: Option<u32>,
}

struct Link {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// Waits between tries: exponential with jitter (so hosts that lost the
/// server at once do not come back in step), within a deadline.
pub struct Backoff {
    start: std::time::Instant,
    budget: Duration,
    next: Duration,
    pub attempts: u32,
}

impl Backoff {
    pub fn new(budget: Duration) -> Self {
        Self { start: std::time::Instant::now(), budget, next: BACKOFF_FIRST, attempts: 0 }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// What is left of the budget.
    pub fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.start.elapsed())
    }

    /// Sleeps before the next try; false (without sleeping) when the wait
    /// would end past the budget.
    pub async fn wait(&mut self) -> bool {
        let jitter = rand::random::<f64>() * 0.5 + 0.5;
        let d = self.next.mul_f64(jitter);
        if self.start.elapsed() + d >= self.budget {
            return false;
        }
        tokio::time::sleep(d).await;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        true
    }
}

/// Requests that can be sent again after a lost connection without a
/// push session: doing them twice is doing them once.
fn reconnectable(req: &Request) -> bool {
    matches!(
        req,
        Request::ListSnapshots { .. }
            | Request::ListSnapshotsFull { .. }
            | Request::GetSnapshot { .. }
            | Request::Protect { .. }
    )
}

/// Requests of a push that can be sent again on the same connection when
/// the server refused them for now (busy, a storage hiccup): it did not
/// act on them (a host over its session limit waits for a session to end
/// or be given up, within the timeout).
fn repeatable(req: &Request) -> bool {
    reconnectable(req) || matches!(req, Request::HasChunks { .. } | Request::StartPush { .. })
}

/// Why one connection attempt failed, and whether another may succeed.
enum Attempt {
    /// No answer in time: down, restarting, or packets lost.
    NoAnswer(String),
    Refused(ClientError),
}

/// A lost connection reported with the reason the server closed it for,
/// when it gave one (a revoked token, a crowded server): "connection
/// lost" alone does not say what to do.
fn closed_or(conn: &quinn::Connection, e: ClientError) -> ClientError {
    match (&e, conn.close_reason()) {
        (ClientError::Link(_) | ClientError::Connect(..), Some(quinn::ConnectionError::ApplicationClosed(c)))
            if !c.reason.is_empty() =>
        {
            ClientError::Closed(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => e,
    }
}

fn unexpected(r: Response) -> ClientError {
    match r {
        Response::Error { code, message } => ClientError::Server(message, code),
        other => ClientError::Protocol(format!("unexpected response {}", response_name(&other))),
    }
}

/// A server that does not know a request added after protocol version 1
/// says it "does not decode": tell the user what to do.
fn older_server(e: ClientError, req: &Request) -> ClientError {
    match (&e, req) {
        (ClientError::Server(m, ErrorCode::BadRequest), Request::CommitIncomplete { .. })
            if m.contains("does not decode") =>
        {
            ClientError::Usage(
                "the server is older than this client and cannot record an incomplete snapshot; upgrade bkp-server, \
                 or exclude the unreadable files"
                    .into(),
            )
        }
        _ => e,
    }
}

/// A response's variant, for messages (its fields may be megabytes).
fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Welcome { .. } => "Welcome",
        Response::PushStarted { .. } => "PushStarted",
        Response::Missing(_) => "Missing",
        Response::PutOk { .. } => "PutOk",
        Response::Committed(_) => "Committed",
        Response::Snapshots(_) => "Snapshots",
        Response::SnapshotsFull(_) => "SnapshotsFull",
        Response::Snapshot { .. } => "Snapshot",
        Response::Chunk { .. } => "Chunk",
        Response::Error { .. } => "Error",
        Response::Done => "Done",
    }
}

impl Client {
    /// Connects, retrying a server that does not answer for `cfg.timeout`.
    pub async fn connect(cfg: &ClientConfig) -> Result<Self> {
        Self::connect_within(cfg, cfg.timeout).await
    }

    /// Connects, retrying a server that does not answer for up to `budget`.
    pub async fn connect_within(cfg: &ClientConfig, budget: Duration) -> Result<Self> {
        Self::connect_opts(cfg, budget, None).await
    }

    /// Connects with a receive window of `window` bytes (connection and
    /// stream) instead of the shared 64 MiB: a reader that paces itself
    /// (a rate-limited sync) then holds the link to its pace from the
    /// first byte. (QUIC credit once granted cannot be taken back, so it
    /// must be small from the handshake on; a relink keeps it.)
    pub async fn connect_paced(cfg: &ClientConfig, window: u32) -> Result<Self> {
        Self::connect_opts(cfg, cfg.timeout, Some(window)).await
    }

    async fn connect_opts(cfg: &ClientConfig, budget: Duration, window: Option<u32>) -> Result<Self> {
        let (link, host, role) = Self::link_within(cfg, budget, window).await?;
        Ok(Self {
            link: std::sync::Mutex::new(link),
            relink: tokio::sync::Mutex::new(()),
            server: cfg.server.clone(),
            host,
            role,
            cfg: cfg.clone(),
            upload_limit: None,
            window,
        })
    }

    async fn link_within(cfg: &ClientConfig, budget: Duration, window: Option<u32>) -> Result<(Link, String, Role)> {
        let mut backoff = Backoff::new(budget);
        loop {
            backoff.attempts += 1;
            // The last attempt ends with the budget, not after it.
            let bound = ATTEMPT_TIMEOUT.min(backoff.remaining()).max(Duration::from_millis(100));
            let why = match tokio::time::timeout(bound, Self::attempt(cfg, window)).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(Attempt::Refused(e))) => return Err(e),
                Ok(Err(Attempt::NoAnswer(why))) => why,
                Err(_) => "no answer".to_string(),
            };
            if !backoff.wait().await {
                return Err(Self::gave_up(cfg, &backoff, &why));
            }
        }
    }

    fn gave_up(cfg: &ClientConfig, b: &Backoff, why: &str) -> ClientError {
        ClientError::NoAnswer(
            cfg.server.clone(),
            format!(
                "{why} after {} attempts in {} s (--timeout {} s); is bkp-server running there, with its UDP port \
                 reachable?",
                b.attempts,
                b.elapsed().as_secs(),
                cfg.timeout.as_secs()
            ),
        )
    }

    fn conn(&self) -> quinn::Connection {
        self.link.lock().expect("link lock").conn.clone()
    }

    /// Replaces the link if it is still `dead` (another request may have
    /// done it already), trying for `budget`.
    async fn relink(&self, dead: &quinn::Connection, budget: Duration) -> Result<()> {
        let _one = self.relink.lock().await;
        if self.conn().stable_id() != dead.stable_id() {
            return Ok(());
        }
        let (link, host, _) = Self::link_within(&self.cfg, budget, self.window).await?;
        if host != self.host {
            return Err(ClientError::Connect(self.server.clone(), format!("the token now belongs to host {host}")));
        }
        let old = std::mem::replace(&mut *self.link.lock().expect("link lock"), link);
        old.conn.close(0u32.into(), b"replaced");
        Ok(())
    }

    async fn attempt(cfg: &ClientConfig, window: Option<u32>) -> std::result::Result<(Link, String, Role), Attempt> {
        let err = |m: String| Attempt::Refused(ClientError::Connect(cfg.server.clone(), m));
        let addr: SocketAddr = tokio::net::lookup_host(&cfg.server)
            .await
            .map_err(|e| err(format!("{e} (expected host:port)")))?
            .next()
            .ok_or_else(|| err("no address".into()))?;
        let name = cfg.server.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or("bkp-server");
        let mut qcfg = quic_config(&cfg.trust).map_err(Attempt::Refused)?;
        if let Some(w) = window {
            let mut t = bkp_common::quic::transport();
            t.receive_window(w.into());
            t.stream_receive_window(w.into());
            qcfg.transport_config(Arc::new(t));
        }
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("bind address");
        let socket = std::net::UdpSocket::bind(bind).map_err(|e| err(e.to_string()))?;
        // The granted buffer size is not reported: a cron job should not
        // warn about a system setting every night (the server does).
        let (mut endpoint, _) = bkp_common::quic::endpoint(socket, None).map_err(|e| err(e.to_string()))?;
        endpoint.set_default_client_config(qcfg);
        let conn = endpoint.connect(addr, name).map_err(|e| err(e.to_string()))?.await.map_err(|e| match e {
            quinn::ConnectionError::TimedOut => Attempt::NoAnswer("no answer".into()),
            e => err(e.to_string()),
        })?;
        // The token is sent only now, after the certificate was checked.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        let hello = Request::Hello {
            magic: MAGIC,
            version: VERSION,
            token: cfg.token.clone(),
            client: format!("bkp {}", bkp_common::VERSION),
        };
        // A refused hello (one too large, say) stops this write; the
        // server's answer says why.
        let _ = write_frame(&mut send, &hello).await;
        let _ = send.finish();
        match read_frame::<Response, _>(&mut recv).await {
            Ok(Some(Response::Welcome { host, role, .. })) => Ok((Link { endpoint, conn }, host, role)),
            Ok(Some(r)) => Err(Attempt::Refused(unexpected(r))),
            Ok(None) => Err(Attempt::Refused(closed_or(
                &conn,
                ClientError::Connect(cfg.server.clone(), "server closed the connection during hello".into()),
            ))),
            Err(e) => Err(Attempt::Refused(closed_or(
                &conn,
                ClientError::Connect(cfg.server.clone(), format!("during hello: {e}")),
            ))),
        }
    }

    /// Has the connection ended (lost, timed out, closed by either end)?
    pub fn is_closed(&self) -> bool {
        self.conn().close_reason().is_some()
    }

    /// A new connection with the same settings, trying for up to `budget`.
    pub async fn reconnect(&self, budget: Duration) -> Result<Self> {
        let mut c = Self::connect_opts(&self.cfg, budget, self.window).await?;
        c.upload_limit = self.upload_limit.clone();
        Ok(c)
    }

    /// Limits chunk uploads to `bytes_per_sec` (0: no limit), for a WAN
    /// link the backup must not fill.
    pub fn limit_upload(&mut self, bytes_per_sec: u64) {
        self.upload_limit = bkp_common::rate::RateLimit::new(bytes_per_sec).map(Arc::new);
    }

    /// Tells the server a push of set `name` failed, so it alerts now.
    pub async fn push_failed(&self, name: &str, kind: Option<SnapshotKind>, reason: &str) -> Result<()> {
        let reason = bkp_common::names::prefix_within(reason, bkp_common::protocol::MAX_REASON);
        let req = Request::PushFailed { name: name.to_string(), kind, reason: reason.to_string() };
        self.call_done(&req).await
    }

    pub async fn close(self) {
        let link = self.link.into_inner().expect("link lock");
        link.conn.close(0u32.into(), b"bye");
        // Every answer has arrived by now; the wait only lets the endpoint
        // send the close frame. Waiting for the whole draining period
        // (three probe timeouts) cost ~80 ms per command on loopback; a
        // close that is lost costs the server one idle connection until
        // its idle timeout.
        let _ = tokio::time::timeout(CLOSE_WAIT, link.endpoint.wait_idle()).await;
    }

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let conn = self.conn();
        conn.open_bi().await.map_err(|e| closed_or(&conn, ClientError::Link(e.into())))
    }

    /// One request, one response; a request safe to repeat is retried
    /// within the timeout (see the module comment).
    async fn call(&self, req: &Request) -> Result<Response> {
        let mut backoff = Backoff::new(self.cfg.timeout);
        loop {
            let conn = self.conn();
            let e = match self.call_once(&conn, req).await {
                Ok(r) => return Ok(r),
                Err(e) => closed_or(&conn, e),
            };
            let lost = conn.close_reason().is_some();
            let again = e.retryable() && if lost { reconnectable(req) } else { repeatable(req) };
            if !again || !backoff.wait().await {
                return Err(e);
            }
            if lost {
                self.relink(&conn, backoff.remaining()).await?;
            }
        }
    }

    async fn call_once(&self, conn: &quinn::Connection, req: &Request) -> Result<Response> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed_or(conn, ClientError::Link(e.into())))?;
        write_frame(&mut send, req).await?;
        let _ = send.finish();
        match read_frame::<Response, _>(&mut recv).await? {
            Some(Response::Error { code, message }) => Err(ClientError::Server(message, code)),
            Some(r) => Ok(r),
            None => Err(ClientError::Link(LinkError::Ended("stream closed before the answer"))),
        }
    }

    pub async fn start_push(&self, name: &str, kind: SnapshotKind) -> Result<u64> {
        match self.call(&Request::StartPush { name: name.to_string(), kind }).await? {
            Response::PushStarted { session } => Ok(session),
            r => Err(unexpected(r)),
        }
    }

    /// Indices of `ids` that must be uploaded.
    pub async fn missing(&self, session: u64, ids: Vec<ChunkId>) -> Result<Vec<u32>> {
        let n = ids.len() as u32;
        match self.call(&Request::HasChunks { session, ids }).await? {
            Response::Missing(m) if m.iter().all(|&i| i < n) => Ok(m),
            r => Err(unexpected(r)),
        }
    }

    /// Uploads encoded chunk blobs on one stream; returns bytes the server
    /// newly stored.
    pub async fn put(&self, session: u64, chunks: Vec<(ChunkId, Vec<u8>)>) -> Result<u64> {
        let conn = self.conn();
        self.put_once(session, chunks).await.map_err(|e| closed_or(&conn, e))
    }

    async fn put_once(&self, session: u64, chunks: Vec<(ChunkId, Vec<u8>)>) -> Result<u64> {
        let (mut send, mut recv) = self.open().await?;
        let mut write_err = None;
        for (id, blob) in chunks {
            if let Some(limit) = &self.upload_limit {
                limit.take(blob.len()).await;
            }
            if let Err(e) = write_frame(&mut send, &Request::PutChunk { session, id, blob }).await {
                // The server stops reading after a refused chunk; its
                // answer says why, so read it before reporting the write.
                write_err = Some(e);
                break;
            }
        }
        let _ = send.finish();
        if let Some(e) = write_err {
            return match read_frame::<Response, _>(&mut recv).await {
                Ok(Some(r)) => Err(unexpected(r)),
                _ => Err(e.into()),
            };
        }
        match read_frame::<Response, _>(&mut recv).await? {
            Some(Response::PutOk { bytes, .. }) => Ok(bytes),
            Some(r) => Err(unexpected(r)),
            None => Err(ClientError::Link(LinkError::Ended("upload stream closed without an answer"))),
        }
    }

    /// Commits the push; `incomplete` names what could not be read. A
    /// connection lost before the request was sent is
    /// [`ClientError::Link`] (nothing committed); lost after, it is
    /// [`ClientError::CommitUnknown`].
    pub async fn commit(
        &self,
        session: u64,
        tree: Vec<ChunkId>,
        incomplete: Option<Incomplete>,
    ) -> Result<SnapshotSummary> {
        let req = match incomplete.clone() {
            None => Request::Commit { session, tree },
            Some(incomplete) => Request::CommitIncomplete { session, tree, incomplete },
        };
        let (mut send, mut recv) = self.open().await?;
        write_frame(&mut send, &req).await?;
        let _ = send.finish();
        let unknown = |e: LinkError| ClientError::CommitUnknown(e);
        match read_frame::<Response, _>(&mut recv).await.map_err(|e| unknown(e.into()))? {
            Some(Response::Committed(s)) => Ok(SnapshotSummary { incomplete, ..SnapshotSummary::from(s) }),
            Some(r) => Err(older_server(unexpected(r), &req)),
            None => Err(unknown(LinkError::Ended("stream closed before the answer"))),
        }
    }

    /// The snapshots, with whether each is complete; from a server older
    /// than `ListSnapshotsFull`, without.
    pub async fn snapshots(&self, host: Option<String>, name: Option<String>) -> Result<Vec<SnapshotSummary>> {
        let full = Request::ListSnapshotsFull { host: host.clone(), name: name.clone() };
        match self.call(&full).await {
            Ok(Response::SnapshotsFull(s)) => return Ok(s),
            Ok(r) => return Err(unexpected(r)),
            Err(ClientError::Server(m, ErrorCode::BadRequest)) if m.contains("does not decode") => {}
            Err(e) => return Err(e),
        }
        match self.call(&Request::ListSnapshots { host, name }).await? {
            Response::Snapshots(s) => Ok(s.into_iter().map(Into::into).collect()),
            r => Err(unexpected(r)),
        }
    }

    pub async fn snapshot(&self, id: SnapshotId) -> Result<Snapshot> {
        match self.call(&Request::GetSnapshot { id }).await? {
            Response::Snapshot { id: got, snapshot } if got == id => Ok(snapshot),
            r => Err(unexpected(r)),
        }
    }

    /// A request whose only answer is `Done`.
    async fn call_done(&self, req: &Request) -> Result<()> {
        match self.call(req).await? {
            Response::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Admin: deletes a snapshot.
    pub async fn forget(&self, id: SnapshotId) -> Result<()> {
        self.call_done(&Request::Forget { id }).await
    }

    /// Admin: protects a snapshot from prune, or lifts that.
    pub async fn protect(&self, id: SnapshotId, protected: bool) -> Result<()> {
        self.call_done(&Request::Protect { id, protected }).await
    }

    /// Fetches one chunk and checks it against its id.
    pub async fn chunk(&self, id: ChunkId) -> Result<Vec<u8>> {
        let mut f = self.fetch(vec![id]).await?;
        match f.next_blob().await? {
            Some((_, blob)) => tokio::task::spawn_blocking(move || {
                crate::crypt::decode_verified(&blob, &id).map_err(ClientError::from)
            })
            .await
            .map_err(|e| ClientError::Task { what: "decoding a chunk", source: e })?,
            None => Err(ClientError::Link(LinkError::Ended("stream closed before the chunk"))),
        }
    }

    /// Asks for the blobs of `ids` (at most the server's 64 per request);
    /// they arrive in order through [`Fetch::next_blob`].
    pub async fn fetch(&self, ids: Vec<ChunkId>) -> Result<Fetch> {
        let (mut send, recv) = self.open().await?;
        write_frame(&mut send, &Request::GetChunks { ids: ids.clone() }).await?;
        let _ = send.finish();
        Ok(Fetch { recv, ids, next: 0, conn: self.conn() })
    }
}

/// The answers to one `GetChunks`.
pub struct Fetch {
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    ids: Vec<ChunkId>,
    next: usize,
}

impl Fetch {
    /// The next id's blob, not yet decoded; `None` once all arrived. A
    /// refusal (`ClientError::Server`) ends the answer: the chunks after
    /// the ones received were not sent.
    pub async fn next_blob(&mut self) -> Result<Option<(ChunkId, Vec<u8>)>> {
        let Some(&want) = self.ids.get(self.next) else { return Ok(None) };
        let frame = read_frame::<Response, _>(&mut self.recv).await.map_err(|e| closed_or(&self.conn, e.into()))?;
        match frame {
            Some(Response::Chunk { id, blob }) if id == want => {
                self.next += 1;
                Ok(Some((id, blob)))
            }
            Some(r) => Err(unexpected(r)),
            None => Err(ClientError::Link(LinkError::Ended("stream closed before the chunk"))),
        }
    }
}
