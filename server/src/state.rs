//! The open server: the store, the live sessions, the job guards, the
//! monitor, the limits and the audit writer, shared by the outer layers
//! (the QUIC endpoint in `server` and `connection`, the control socket,
//! the HTTP endpoint, the scheduler, the CLI). Everything below them takes
//! only the parts it needs: [`ServerState::jobs`] and
//! [`ServerState::monitor_inputs`] hand them out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

    /// What a job run needs (see `crate::jobs`).
    pub fn jobs(&self) -> crate::jobs::Jobs<'_> {
        crate::jobs::Jobs {
            store: self.store.as_ref(),
            sessions: &self.sessions,
            running: &self.running,
            audit: &self.audit,
            retention: &self.config.retention,
            verify: &self.config.verify,
            sync: &self.config.sync,
            max_pushes_per_day: self.config.max_pushes_per_day,
            by: "schedule",
        }
    }

    /// What the monitor, `/metrics` and the status report read.
    pub fn monitor_inputs(&self) -> crate::monitor::Inputs<'_> {
        crate::monitor::Inputs {
            store: self.store.as_ref(),
            sessions: &self.sessions,
            running: &self.running,
            monitor: &self.monitor,
            data_dir: &self.data_dir,
            freshness: &self.config.freshness,
            alerts: &self.config.alerts,
            jobs: &self.config.jobs,
            stats_interval: self.config.monitor.stats_interval,
            sync: &self.config.sync,
        }
    }
}
