//! The open server: the store, the live sessions, the job guards, the
//! monitor, the limits and the audit writer, shared by the outer layers
//! (the QUIC endpoint in `server` and `connection`, the control socket,
//! the HTTP endpoint, the scheduler, the CLI). Everything below them takes
//! only the parts it needs: [`ServerState::jobs`] and
//! [`ServerState::monitor_inputs`] hand them out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::audit::{Event, Line};
use crate::config::{ConfigError, ConfigSource, Reloaded, ServerConfig};
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
    store: Arc<dyn Store>,
    sessions: Sessions,
    running: crate::jobs::Running,
    data_dir: PathBuf,
    /// The config in force: swapped whole by a reload, so a reader holds
    /// one consistent version for as long as it needs it ([`Self::config`]).
    config: RwLock<Arc<ServerConfig>>,
    /// Where a reload reads the config from.
    source: ConfigSource,
    /// Bumped by every reload that applied something (the scheduler
    /// re-reads its schedules).
    reloads: tokio::sync::watch::Sender<u64>,
    monitor: crate::monitor::Monitor,
    /// Connection slots, frame budgets and the live-connection registry.
    limits: Arc<Limits>,
    /// The audit log's writer (see `crate::audit`).
    audit: crate::audit::Audit,
}

impl ServerState {
    /// Opens the server on `data_dir` with `config`; a reload reads
    /// `DATA/server.toml` (or the defaults).
    pub fn open(data_dir: &Path, config: ServerConfig) -> Result<Arc<Self>, ServerError> {
        Self::open_from(data_dir, config, ConfigSource::default())
    }

    /// As [`Self::open`], for a config read from `source` (what `serve`
    /// was given), which a reload reads again.
    pub fn open_from(data_dir: &Path, config: ServerConfig, source: ConfigSource) -> Result<Arc<Self>, ServerError> {
        if !data_dir.join(tls::CERT_FILE).exists() {
            return Err(ServerError::NotInitialised(data_dir.display().to_string()));
        }
        let store =
            crate::store::s3::open_store(&data_dir.join(DB_DIR), config.cache_mb << 20, &config.storage, data_dir)?;
        let sessions = Sessions::new(Duration::from_secs(config.session_lease_secs))
            .with_limits(config.limits.sessions, config.limits.sessions_per_host)
            .with_touched_budget(config.limits.touched_mb.saturating_mul(1 << 20));
        let limits = Limits::new(config.limits.clone(), config.max_connections);
        let audit = crate::audit::Audit::start(data_dir, config.audit.clone());
        Ok(Arc::new(Self {
            limits,
            audit,
            store: Arc::new(store),
            sessions,
            running: Default::default(),
            data_dir: data_dir.to_path_buf(),
            config: RwLock::new(Arc::new(config)),
            source,
            reloads: tokio::sync::watch::channel(0).0,
            monitor: Default::default(),
        }))
    }

    /// The config in force now (a reload swaps it; this one stays whole).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Wakes when a reload applied something.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Reads the config file again and puts in force what may change while
    /// the server runs (see [`ServerConfig::reloaded`]). A file that does
    /// not load is refused whole and the running config stays. Logged and
    /// audited; `by` says who asked ("signal SIGHUP", a socket peer).
    /// Blocks (reads the file): call it off the async runtime.
    pub fn reload(&self, by: &str) -> Result<Reloaded, ConfigError> {
        let file = self.source.file(&self.data_dir);
        let shown = file.as_ref().map_or("the defaults (no config file)".to_string(), |f| f.display().to_string());
        let new = match self.source.load(&self.data_dir) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("config reload refused: {e}; the running config stays in force");
                self.audit.record(Line::new(Event::Reload, "failed").by(by).detail(e.to_string()));
                return Err(e);
            }
        };
        let mut r = {
            let mut cur = self.config.write().expect("config lock");
            let (next, r) = cur.reloaded(new, self.source.listen_fixed);
            *cur = Arc::new(next);
            r
        };
        r.file = file.map(|f| f.display().to_string());
        if r.needs_restart.is_empty() {
            tracing::info!("config reloaded from {shown}: {}", r.summary());
        } else {
            tracing::warn!("config reloaded from {shown}: {}", r.summary());
        }
        self.audit.record(Line::new(Event::Reload, "ok").by(by).detail(format!("{shown}: {}", r.summary())));
        if !r.applied.is_empty() {
            self.reloads.send_modify(|n| *n += 1);
            self.monitor.nudge.notify_one();
        }
        Ok(r)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The live push sessions (and the GC fence).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The one-run-per-kind guards and the job records not yet written.
    pub fn running(&self) -> &crate::jobs::Running {
        &self.running
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Counters, caches and the nudge of the monitor loop.
    pub fn monitor(&self) -> &crate::monitor::Monitor {
        &self.monitor
    }

    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    pub fn audit(&self) -> &crate::audit::Audit {
        &self.audit
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        Arc::new(Tokens::new(&self.data_dir))
    }

    /// What a job run needs (see `crate::jobs`), with the settings of
    /// `cfg` (`&state.config()`: one version for the whole run).
    pub fn jobs<'a>(&'a self, cfg: &'a ServerConfig) -> crate::jobs::Jobs<'a> {
        crate::jobs::Jobs {
            store: self.store.as_ref(),
            sessions: &self.sessions,
            running: &self.running,
            audit: &self.audit,
            retention: &cfg.retention,
            verify: &cfg.verify,
            sync: &cfg.sync,
            max_pushes_per_day: cfg.max_pushes_per_day,
            gc: &cfg.gc,
            record_days: cfg.jobs.record_days,
            by: "schedule",
        }
    }

    /// What the monitor, `/metrics` and the status report read, with the
    /// settings of `cfg` (`&state.config()`).
    pub fn monitor_inputs<'a>(&'a self, cfg: &'a ServerConfig) -> crate::monitor::Inputs<'a> {
        crate::monitor::Inputs {
            store: self.store.as_ref(),
            sessions: &self.sessions,
            running: &self.running,
            monitor: &self.monitor,
            data_dir: &self.data_dir,
            freshness: &cfg.freshness,
            alerts: &cfg.alerts,
            jobs: &cfg.jobs,
            stats_interval: cfg.monitor.stats_interval,
            sync: &cfg.sync,
        }
    }
}
