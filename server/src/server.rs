//! The server as a library: open a data directory, bind an endpoint, run
//! until `shutdown` resolves. Tests call [`run`] on 127.0.0.1:0.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::limits::Limits;
use crate::sessions::Sessions;
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};
use crate::tokens::Tokens;

pub const DB_DIR: &str = "db";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0} is not an initialised data directory; run `bkp-server init --data {0}`")]
    NotInitialised(String),
}

pub struct ServerState {
    pub store: Arc<dyn Store>,
    pub sessions: Sessions,
    pub running: crate::jobs::Running,
    pub data_dir: PathBuf,
    pub config: ServerConfig,
    pub monitor: crate::monitor::Monitor,
    /// Connection slots, frame budgets and the live-connection registry.
    pub limits: Arc<Limits>,
    /// The audit log's writer (see `crate::audit`).
    pub audit: crate::audit::Audit,
}

impl ServerState {
    pub fn open(data_dir: &Path, config: ServerConfig) -> Result<Arc<Self>, ServerError> {
        if !data_dir.join(tls::CERT_FILE).exists() {
            return Err(ServerError::NotInitialised(data_dir.display().to_string()));
        }
        let store =
            crate::store::s3::open_store(&data_dir.join(DB_DIR), config.cache_mb << 20, &config.storage, data_dir)?;
        let sessions = Sessions::new(Duration::from_secs(config.session_lease_secs))
            .with_limits(config.limits.sessions, config.limits.sessions_per_host);
        let limits = Limits::new(config.limits.clone(), config.max_connections);
        let audit = crate::audit::Audit::start(data_dir, config.audit.clone());
        Ok(Arc::new(Self {
            limits,
            audit,
            store: Arc::new(store),
            sessions,
            running: Default::default(),
            data_dir: data_dir.to_path_buf(),
            config,
            monitor: Default::default(),
        }))
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        Arc::new(Tokens::new(&self.data_dir))
    }
}

/// Connection receive window until the hello is authenticated: room for
/// a hello (at most 4 KiB) and the length prefix of an oversized one.
pub const HELLO_WINDOW: u32 = 16 << 10;

/// The transport a connection starts with: the shared one, with one
/// stream and a small window, so that a peer that has not authenticated
/// can make the server buffer only [`HELLO_WINDOW`] bytes. The hello
/// raises both to the shared values (`connection.rs`), so an established
/// connection runs exactly on `bkp_common::quic::transport()`.
fn unauthenticated_transport() -> quinn::TransportConfig {
    let mut t = bkp_common::quic::transport();
    t.max_concurrent_bidi_streams(1u32.into());
    t.receive_window(HELLO_WINDOW.into());
    t
}

/// Binds the QUIC endpoint with the data directory's certificate.
pub fn bind(data_dir: &Path, listen: SocketAddr) -> Result<quinn::Endpoint, ServerError> {
    let mut cfg = tls::server_config(data_dir)?;
    cfg.transport_config(Arc::new(unauthenticated_transport()));
    // 0-RTT data buffered for a connection not yet accepted: none is used.
    cfg.incoming_buffer_size(HELLO_WINDOW.into());
    cfg.incoming_buffer_size_total(4 << 20);
    let socket = std::net::UdpSocket::bind(listen).map_err(|e| ServerError::Bind(listen, e))?;
    let (endpoint, granted) =
        bkp_common::quic::endpoint(socket, Some(cfg)).map_err(|e| ServerError::Bind(listen, e))?;
    if granted < bkp_common::quic::SOCKET_BUFFER_BYTES / 2 {
        tracing::warn!(
            "UDP receive buffer is {} KiB, below the {} KiB asked for: uploads from several hosts at once \
             may lose datagrams and slow down; raise it with `sysctl -w net.core.rmem_max={}`",
            granted >> 10,
            bkp_common::quic::SOCKET_BUFFER_BYTES >> 10,
            bkp_common::quic::SOCKET_BUFFER_BYTES
        );
    }
    Ok(endpoint)
}

/// Everything `bkp-server serve` runs: the QUIC endpoint, the control
/// socket, the job scheduler, the monitor (alerts) and, when configured,
/// the monitoring HTTP endpoint, until `shutdown` resolves.
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Bound first: a taken port fails the start before anything runs.
    let http = match state.config.monitor.listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding the monitoring address {addr}: {e}")))?,
        ),
    };
    let control = crate::control::bind(&state.data_dir)?;
    let mut tasks = vec![
        tokio::spawn(crate::control::serve(control, state.clone())),
        tokio::spawn(crate::jobs::scheduler(state.clone())),
        tokio::spawn(crate::monitor::run(state.clone())),
    ];
    if let Some(l) = http {
        let addr = l.local_addr()?;
        *state.monitor.http_addr.lock().expect("http addr lock") = Some(addr);
        info!("metrics on http://{addr}/metrics");
        let st = state.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::http::serve(l, st).await {
                warn!("monitoring endpoint stopped: {e}");
            }
        }));
    }
    let data = state.data_dir.clone();
    run(endpoint, state, shutdown).await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(crate::control::socket_path(&data));
    Ok(())
}

/// Serves connections until `shutdown` resolves, then closes them and
/// waits (briefly) for in-flight work. Also watches the token file, so
/// revocations reach open connections.
pub async fn run(endpoint: quinn::Endpoint, state: Arc<ServerState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    info!(addr = ?endpoint.local_addr().ok(), "serving");
    let watcher = tokio::spawn(crate::limits::watch_tokens(state.clone()));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                // Nothing is kept for an address until it has answered a
                // retry: a datagram with a forged source costs one reply.
                if !inc.remote_address_validated() {
                    if inc.may_retry() {
                        if let Err(e) = inc.retry() {
                            debug!("retry not sent: {e}");
                        }
                    } else {
                        inc.ignore();
                    }
                    continue;
                }
                let slot = state.limits.pending(inc.remote_address().ip());
                let state = state.clone();
                tokio::spawn(crate::connection::handle(inc, state, slot));
            }
        }
    }
    watcher.abort();
    let _ = watcher.await;
    endpoint.close(0u32.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    info!("stopped");
}
