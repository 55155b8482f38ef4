//! A connection to the server: TLS with a pinned certificate (or a CA),
//! the hello handshake, and one method per request.
//!
//! Connecting retries a server that does not answer (down, restarting,
//! packets lost) with backoff for [`CONNECT_BUDGET`], each attempt bounded
//! by [`ATTEMPT_TIMEOUT`]; a server that answers and refuses (certificate,
//! token, version) is not retried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bkp_common::blob;
use bkp_common::io::{read_frame, write_frame};
use bkp_common::protocol::{Request, Response, Role, ALPN, MAGIC, VERSION};
use bkp_common::snapshot::{Snapshot, SnapshotKind, SnapshotSummary};
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
/// How long a connect keeps trying a server that does not answer: long
/// enough to ride out a server restart.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(30);
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

/// An authenticated connection.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The address as configured (names the metadata cache).
    pub server: String,
    pub host: String,
    pub role: Role,
    /// Kept to connect again (to report a push the connection lost).
    cfg: ClientConfig,
    /// `--limit-upload`: chunk uploads wait for it (kept on reconnect).
    upload_limit: Option<Arc<bkp_common::rate::RateLimit>>,
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

/// A response's variant, for messages (its fields may be megabytes).
fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Welcome { .. } => "Welcome",
        Response::PushStarted { .. } => "PushStarted",
        Response::Missing(_) => "Missing",
        Response::PutOk { .. } => "PutOk",
        Response::Committed(_) => "Committed",
        Response::Snapshots(_) => "Snapshots",
        Response::Snapshot { .. } => "Snapshot",
        Response::Chunk { .. } => "Chunk",
        Response::Error { .. } => "Error",
        Response::Done => "Done",
    }
}

impl Client {
    pub async fn connect(cfg: &ClientConfig) -> Result<Self> {
        Self::connect_within(cfg, CONNECT_BUDGET).await
    }

    /// Connects, retrying a server that does not answer for up to `budget`.
    pub async fn connect_within(cfg: &ClientConfig, budget: Duration) -> Result<Self> {
        Self::connect_opts(cfg, budget, None).await
    }

    /// Connects with a receive window of `window` bytes (connection and
    /// stream) instead of the shared 64 MiB: a reader that paces itself
    /// (a rate-limited sync) then holds the link to its pace from the
    /// first byte. (QUIC credit once granted cannot be taken back, so it
    /// must be small from the handshake on.)
    pub async fn connect_paced(cfg: &ClientConfig, window: u32) -> Result<Self> {
        Self::connect_opts(cfg, CONNECT_BUDGET, Some(window)).await
    }

    async fn connect_opts(cfg: &ClientConfig, budget: Duration, window: Option<u32>) -> Result<Self> {
        let start = std::time::Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match tokio::time::timeout(ATTEMPT_TIMEOUT, Self::attempt(cfg, window)).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(Attempt::Refused(e))) => return Err(e),
                Ok(Err(Attempt::NoAnswer(why))) if start.elapsed() + backoff >= budget => {
                    return Err(Self::gave_up(cfg, attempts, start, &why))
                }
                Err(_) if start.elapsed() + backoff >= budget => {
                    return Err(Self::gave_up(cfg, attempts, start, "no answer"))
                }
                _ => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(4));
        }
    }

    fn gave_up(cfg: &ClientConfig, attempts: u32, start: std::time::Instant, why: &str) -> ClientError {
        ClientError::NoAnswer(
            cfg.server.clone(),
            format!(
                "{why} after {attempts} attempts in {} s; is bkp-server running there, with its UDP port reachable?",
                start.elapsed().as_secs()
            ),
        )
    }

    async fn attempt(cfg: &ClientConfig, window: Option<u32>) -> std::result::Result<Self, Attempt> {
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
            Ok(Some(Response::Welcome { host, role, .. })) => Ok(Self {
                endpoint,
                conn,
                server: cfg.server.clone(),
                host,
                role,
                cfg: cfg.clone(),
                upload_limit: None,
            }),
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
        self.conn.close_reason().is_some()
    }

    /// A new connection with the same settings, trying for up to `budget`.
    pub async fn reconnect(&self, budget: Duration) -> Result<Self> {
        let mut c = Self::connect_within(&self.cfg, budget).await?;
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
        self.conn.close(0u32.into(), b"bye");
        // Every answer has arrived by now; the wait only lets the endpoint
        // send the close frame. Waiting for the whole draining period
        // (three probe timeouts) cost ~80 ms per command on loopback; a
        // close that is lost costs the server one idle connection until
        // its idle timeout.
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        self.conn.open_bi().await.map_err(|e| closed_or(&self.conn, ClientError::Link(e.into())))
    }

    /// One request, one response.
    async fn call(&self, req: &Request) -> Result<Response> {
        self.call_once(req).await.map_err(|e| closed_or(&self.conn, e))
    }

    async fn call_once(&self, req: &Request) -> Result<Response> {
        let (mut send, mut recv) = self.open().await?;
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
        self.put_once(session, chunks).await.map_err(|e| closed_or(&self.conn, e))
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

    /// Commits the push. A connection lost before the request was sent is
    /// [`ClientError::Link`] (nothing committed); lost after, it is
    /// [`ClientError::CommitUnknown`].
    pub async fn commit(&self, session: u64, tree: Vec<ChunkId>) -> Result<SnapshotSummary> {
        let (mut send, mut recv) = self.open().await?;
        write_frame(&mut send, &Request::Commit { session, tree }).await?;
        let _ = send.finish();
        let unknown = |e: LinkError| ClientError::CommitUnknown(e);
        match read_frame::<Response, _>(&mut recv).await.map_err(|e| unknown(e.into()))? {
            Some(Response::Committed(s)) => Ok(s),
            Some(r) => Err(unexpected(r)),
            None => Err(unknown(LinkError::Ended("stream closed before the answer"))),
        }
    }

    pub async fn snapshots(&self, host: Option<String>, name: Option<String>) -> Result<Vec<SnapshotSummary>> {
        match self.call(&Request::ListSnapshots { host, name }).await? {
            Response::Snapshots(s) => Ok(s),
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
                blob::decode_verified(&blob, &id).map_err(|e| ClientError::Corrupt(e.into()))
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
        Ok(Fetch { recv, ids, next: 0, conn: self.conn.clone() })
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
