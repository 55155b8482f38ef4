//! The server as a library: open a data directory, bind an endpoint, run
//! until `shutdown` resolves. Tests call [`run`] on 127.0.0.1:0.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::ServerConfig;
use crate::sessions::Sessions;
use crate::store::rocks::RocksStore;
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
}

impl ServerState {
    pub fn open(data_dir: &Path, config: ServerConfig) -> Result<Arc<Self>, ServerError> {
        if !data_dir.join(tls::CERT_FILE).exists() {
            return Err(ServerError::NotInitialised(data_dir.display().to_string()));
        }
        let store = RocksStore::open(&data_dir.join(DB_DIR), config.cache_mb << 20)?;
        let sessions = Sessions::new(Duration::from_secs(config.session_lease_secs));
        Ok(Arc::new(Self {
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

/// Binds the QUIC endpoint with the data directory's certificate.
pub fn bind(data_dir: &Path, listen: SocketAddr) -> Result<quinn::Endpoint, ServerError> {
    let cfg = tls::server_config(data_dir)?;
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
/// waits (briefly) for in-flight work.
pub async fn run(endpoint: quinn::Endpoint, state: Arc<ServerState>, shutdown: impl Future<Output = ()>) {
    let limit = Arc::new(Semaphore::new(state.config.max_connections));
    tokio::pin!(shutdown);
    info!(addr = ?endpoint.local_addr().ok(), "serving");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    warn!("connection limit reached; refusing {}", inc.remote_address());
                    inc.refuse();
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    crate::connection::handle(inc, state).await;
                    drop(permit);
                });
            }
        }
    }
    endpoint.close(0u32.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    info!("stopped");
}
