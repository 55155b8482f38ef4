//! `bkp-server serve --config FILE`: the server's TOML configuration,
//! and what of it a reload (SIGHUP, `bkp-server reload`) may change while
//! the server runs ([`ServerConfig::reloaded`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::monitor::MonitorConfig;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// QUIC listen address; `--listen` overrides it.
    pub listen: SocketAddr,
    /// RocksDB block cache, MiB: the main knob for server memory.
    pub cache_mb: usize,
    /// Simultaneous authenticated client connections; more are refused.
    /// Connections still in their handshake have a pool of their own
    /// (`limits.unauthenticated`).
    pub max_connections: usize,
    /// A push silent for this long loses its session (and its claim on
    /// chunks against garbage collection); its commit then fails.
    pub session_lease_secs: u64,
    /// Snapshots one set may receive in 24 hours (0: no limit); a commit
    /// past it is refused. Bounds what a stolen push token can add.
    pub max_pushes_per_day: u32,
    pub retention: crate::prune::RetentionConfig,
    pub jobs: crate::jobs::JobsConfig,
    /// `[gc]`: the mark set's memory budget, when chunk files are rewritten.
    pub gc: crate::gc::GcConfig,
    pub verify: crate::verify::VerifyConfig,
    pub freshness: crate::freshness::FreshnessConfig,
    pub alerts: crate::alerts::AlertsConfig,
    pub monitor: MonitorConfig,
    pub limits: crate::limits::LimitsConfig,
    pub audit: crate::audit::AuditConfig,
    /// Where chunk data lives: local RocksDB, or packs in an S3 bucket.
    pub storage: crate::store::object::config::StorageConfig,
    /// `[[sync]]`: other servers whose snapshots this one copies.
    pub sync: Vec<crate::sync::SyncJob>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".parse().expect("valid default address"),
            cache_mb: 128,
            max_connections: 256,
            session_lease_secs: 3600,
            max_pushes_per_day: 0,
            retention: Default::default(),
            jobs: Default::default(),
            gc: Default::default(),
            verify: Default::default(),
            freshness: Default::default(),
            alerts: Default::default(),
            monitor: Default::default(),
            limits: Default::default(),
            audit: Default::default(),
            storage: Default::default(),
            sync: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {msg}")]
pub struct ConfigError {
    pub path: String,
    pub msg: String,
}

/// Where a server's config comes from, kept so a reload reads the same
/// place: `--config FILE`, else `DATA/server.toml` when present, else the
/// defaults; `listen_fixed`: `--listen` overrides the file's address.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub explicit: Option<PathBuf>,
    pub listen_fixed: bool,
}

impl ConfigSource {
    /// The file a load reads, if any (`None`: the defaults).
    pub fn file(&self, data: &Path) -> Option<PathBuf> {
        let default = data.join("server.toml");
        match &self.explicit {
            Some(p) => Some(p.clone()),
            None if default.exists() => Some(default),
            None => None,
        }
    }

    pub fn load(&self, data: &Path) -> Result<ServerConfig, ConfigError> {
        match self.file(data) {
            Some(p) => ServerConfig::load(&p),
            None => Ok(ServerConfig::default()),
        }
    }
}

/// What a reload did: the sections it put in force, and those that
/// changed in the file but keep their running value until a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// The file read (`None`: no file, the defaults).
    pub file: Option<String>,
    pub applied: Vec<String>,
    pub needs_restart: Vec<String>,
}

impl Reloaded {
    /// One line for the log, the audit log and `bkp-server reload`.
    pub fn summary(&self) -> String {
        let list = |l: &[String]| if l.is_empty() { "nothing".to_string() } else { l.join(", ") };
        let mut s = format!("applied: {}", list(&self.applied));
        if !self.needs_restart.is_empty() {
            s += &format!(
                "; changed but needs a restart (the running value stays until then): {}",
                self.needs_restart.join(", ")
            );
        }
        s
    }
}

impl ServerConfig {
    /// The config to run with after reading `new` for a reload, and what
    /// changed. Retention, jobs, verify, freshness, alerts, the monitor's
    /// intervals and `max_pushes_per_day` are read afresh by whoever uses
    /// them, so they take effect at once. What was set up once at start
    /// (the listeners, the store, the caches, the sessions' lease, the
    /// limits, the audit writer) keeps its running value and is reported
    /// in `needs_restart`. `listen_fixed`: `--listen` set the address, so
    /// the file's is not in force anyway.
    pub fn reloaded(&self, mut new: ServerConfig, listen_fixed: bool) -> (ServerConfig, Reloaded) {
        let mut r = Reloaded::default();
        fn live<T: PartialEq>(r: &mut Reloaded, name: &str, old: &T, new: &T) {
            if old != new {
                r.applied.push(name.into());
            }
        }
        fn fixed<T: PartialEq + Clone>(r: &mut Reloaded, name: &str, old: &T, new: &mut T) {
            if old != new {
                r.needs_restart.push(name.into());
                *new = old.clone();
            }
        }
        live(&mut r, "retention", &self.retention, &new.retention);
        live(&mut r, "jobs", &self.jobs, &new.jobs);
        live(&mut r, "gc", &self.gc, &new.gc);
        live(&mut r, "verify", &self.verify, &new.verify);
        live(&mut r, "freshness", &self.freshness, &new.freshness);
        live(&mut r, "alerts", &self.alerts, &new.alerts);
        live(&mut r, "monitor.check_interval", &self.monitor.check_interval, &new.monitor.check_interval);
        live(&mut r, "monitor.stats_interval", &self.monitor.stats_interval, &new.monitor.stats_interval);
        live(&mut r, "max_pushes_per_day", &self.max_pushes_per_day, &new.max_pushes_per_day);
        if listen_fixed {
            new.listen = self.listen;
        }
        fixed(&mut r, "listen", &self.listen, &mut new.listen);
        fixed(&mut r, "monitor.listen", &self.monitor.listen, &mut new.monitor.listen);
        fixed(&mut r, "cache_mb", &self.cache_mb, &mut new.cache_mb);
        fixed(&mut r, "max_connections", &self.max_connections, &mut new.max_connections);
        fixed(&mut r, "session_lease_secs", &self.session_lease_secs, &mut new.session_lease_secs);
        fixed(&mut r, "limits", &self.limits, &mut new.limits);
        fixed(&mut r, "audit", &self.audit, &mut new.audit);
        fixed(&mut r, "storage", &self.storage, &mut new.storage);
        // The sync scheduler reads its plans once, at start.
        fixed(&mut r, "sync", &self.sync, &mut new.sync);
        // A field added to the config fails to compile here until it is
        // sorted into one of the two lists above.
        let ServerConfig {
            listen: _,
            cache_mb: _,
            max_connections: _,
            session_lease_secs: _,
            max_pushes_per_day: _,
            retention: _,
            jobs: _,
            gc: _,
            verify: _,
            freshness: _,
            alerts: _,
            monitor: MonitorConfig { listen: _, check_interval: _, stats_interval: _ },
            limits: _,
            audit: _,
            storage: _,
            sync: _,
        } = self;
        (new, r)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| err(one_line(&text, &e)))?;
        for (_, expr) in cfg.jobs.schedules() {
            if let Some(expr) = expr {
                crate::jobs::parse_schedule(expr).map_err(|e| err(e.to_string()))?;
            }
        }
        cfg.alerts.check().map_err(|e| err(e.to_string()))?;
        cfg.storage.check().map_err(|e| err(e.to_string()))?;
        crate::sync::config::check_all(&cfg.sync).map_err(err)?;
        for j in &cfg.sync {
            if let Some(expr) = &j.schedule {
                crate::jobs::parse_schedule(expr).map_err(|e| err(format!("[[sync]] {}: {e}", j.name)))?;
            }
        }
        Ok(cfg)
    }
}

/// A TOML error as one line ("line 4, column 1: unknown field ..."):
/// the parser's own text spans several lines with a snippet of the file,
/// which a log line (the journal) and the audit log cannot show.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_file_is_refused_in_one_line_that_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.toml");
        std::fs::write(&p, "[freshness]\ninterval = \"1h\"\n[retention.default]\nkeep_lats = 1\n").unwrap();
        let e = ServerConfig::load(&p).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(&format!("config file {}: line 4, column 1: unknown field `keep_lats`", p.display())),
            "{e}"
        );
        std::fs::write(&p, "[jobs]\nprune = \"0 4 * * 1\"\n").unwrap();
        assert!(ServerConfig::load(&p).unwrap_err().to_string().contains("write weekdays as names"));
    }

    #[test]
    fn a_reload_applies_live_sections_and_keeps_the_rest() {
        let old = ServerConfig::default();
        let mut new: ServerConfig = toml::from_str(
            "listen = \"0.0.0.0:9\"\ncache_mb = 1\nmax_pushes_per_day = 4\n[retention.default]\nkeep_last = 1\n\
             [monitor]\nlisten = \"127.0.0.1:9\"\ncheck_interval = \"1s\"\n[limits]\nsessions = 3\n",
        )
        .unwrap();
        let (run, r) = old.reloaded(new.clone(), false);
        assert_eq!(r.applied, ["retention", "monitor.check_interval", "max_pushes_per_day"]);
        assert_eq!(r.needs_restart, ["listen", "monitor.listen", "cache_mb", "limits"]);
        assert_eq!((run.retention.default.keep_last, run.max_pushes_per_day), (1, 4));
        assert_eq!(run.monitor.check_interval, std::time::Duration::from_secs(1));
        assert_eq!((run.listen, run.monitor.listen, run.cache_mb), (old.listen, None, old.cache_mb));
        assert_eq!(run.limits, old.limits);
        assert!(r.summary().contains("needs a restart") && r.summary().contains("cache_mb"), "{}", r.summary());
        // With `--listen` given, the file's address was never in force.
        new.listen = "0.0.0.0:9".parse().unwrap();
        let (_, r) = old.reloaded(new, true);
        assert!(!r.needs_restart.contains(&"listen".to_string()), "{r:?}");
        // The same file again: nothing to apply.
        let (_, r) = run.reloaded(run.clone(), false);
        assert_eq!(r, Reloaded::default());
        assert_eq!(r.summary(), "applied: nothing");
    }

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c: ServerConfig = toml::from_str("listen = \"0.0.0.0:9000\"\ncache_mb = 64").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.cache_mb, 64);
        assert!(toml::from_str::<ServerConfig>("lisen = \"x\"").is_err());
        let c: ServerConfig = toml::from_str(
            "[retention.default]\nkeep_daily = 30\n[retention.sets.\"web01/pgdump\"]\nkeep_within = \"90d\"\n[jobs]\nprune = \"0 4 * * *\"",
        )
        .unwrap();
        assert_eq!(c.retention.default.keep_daily, 30);
        assert_eq!(c.retention.policy("web01", "pgdump").keep_within, Some(std::time::Duration::from_secs(90 * 86400)));
        assert_eq!(c.retention.policy("web01", "files").keep_daily, 30);
        let c: ServerConfig = toml::from_str("[limits]\nconnections_per_token = 2").unwrap();
        assert_eq!((c.limits.connections_per_token, c.limits.sessions_per_host), (2, 16));
        assert!(toml::from_str::<ServerConfig>("[limits]\nconections = 2").is_err());
    }

    #[test]
    fn sync_jobs_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.toml");
        let job = format!(
            "[[sync]]\nname = \"primary\"\nserver = \"b1:7443\"\nfingerprint = \"{}\"\ntoken_file = \"/t\"\n",
            "ab".repeat(32)
        );
        std::fs::write(&p, format!("{job}schedule = \"15 * * * *\"\n")).unwrap();
        assert_eq!(ServerConfig::load(&p).unwrap().sync[0].name, "primary");
        std::fs::write(&p, format!("{job}schedule = \"15 * *\"\n")).unwrap();
        let e = ServerConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("[[sync]] primary") && e.contains("5 fields"), "{e}");
        std::fs::write(&p, format!("{job}{job}")).unwrap();
        assert!(ServerConfig::load(&p).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn min_age_defaults_to_a_week_in_every_policy() {
        let week = crate::retention::MIN_AGE;
        let c: ServerConfig = toml::from_str("[retention.sets.\"web01/db\"]\nkeep_last = 3").unwrap();
        assert_eq!((c.retention.default.min_age, c.retention.policy("web01", "db").min_age), (week, week));
        let c: ServerConfig =
            toml::from_str("[retention.default]\nmin_age = \"1d\"\n[retention.sets.\"web01/db\"]\nmin_age = \"0s\"")
                .unwrap();
        assert_eq!(c.retention.default.min_age, std::time::Duration::from_secs(86_400));
        assert_eq!(c.retention.policy("web01", "db").min_age, std::time::Duration::ZERO);
        assert!(toml::from_str::<ServerConfig>("[retention.default]\nmin_age = \"a week\"").is_err());
        assert_eq!(ServerConfig::default().max_pushes_per_day, 0, "no limit unless set");
        assert_eq!(toml::from_str::<ServerConfig>("max_pushes_per_day = 48").unwrap().max_pushes_per_day, 48);
    }

    /// The annotated example, shipped as /etc/bkp/server.toml: every
    /// value it sets is the default (so installing the package changes
    /// nothing), and every commented-out example is a key the server
    /// accepts with a value it accepts.
    #[test]
    fn packaged_example_config_is_current() {
        let text = include_str!("../../packaging/examples/server.toml");
        let dir = tempfile::tempdir().unwrap();
        let (shipped, all) = (dir.path().join("shipped.toml"), dir.path().join("all.toml"));
        std::fs::write(&shipped, text).unwrap();
        std::fs::write(&all, uncomment_examples(text)).unwrap();
        let c = ServerConfig::load(&shipped).unwrap();
        assert_eq!(format!("{c:?}"), format!("{:?}", ServerConfig::default()));
        let c = ServerConfig::load(&all).unwrap();
        assert_eq!((c.retention.default.keep_daily, c.retention.default.keep_yearly), (14, 5));
        assert_eq!(c.retention.policy("db01", "pgdump").keep_monthly, 24);
        assert!(c.jobs.prune.is_some() && c.jobs.gc.is_some() && c.jobs.verify.is_some());
        assert!(c.verify.max_duration.is_some() && c.freshness.interval.is_some());
        assert!(c.freshness.sets.contains_key("web01/pgdump"));
        assert_eq!((c.alerts.webhooks.len(), c.alerts.command.is_some(), c.alerts.email.len()), (1, true, 1));
        assert!(c.monitor.listen.is_some());
        let s = &c.storage;
        assert_eq!(s.backend, crate::store::object::config::Backend::S3);
        assert!(s.endpoint.is_some() && s.bucket.is_some() && s.credentials_file.is_some() && s.ca_file.is_some());
        assert_eq!((s.pack_size, s.cache_size), (32 << 20, 8 << 30));
        let j = &c.sync[0];
        assert_eq!((c.sync.len(), j.rate_limit, j.hosts.len()), (1, 20_000_000, 2));
        assert!(j.schedule.is_some() && !j.remove_vanished);
    }

    /// `#key = value` and `#[table]` lines without the `#`; prose
    /// comments (`# ...`) stay.
    fn uncomment_examples(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
