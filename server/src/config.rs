//! `bkp-server serve --config FILE`: the server's TOML configuration.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
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
    pub verify: crate::verify::VerifyConfig,
    pub freshness: crate::freshness::FreshnessConfig,
    pub alerts: crate::alerts::AlertsConfig,
    pub monitor: crate::monitor::MonitorConfig,
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

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        for (_, expr) in cfg.jobs.schedules() {
            if let Some(expr) = expr {
                crate::jobs::parse_schedule(expr).map_err(|e| err(e.to_string()))?;
            }
        }
        cfg.alerts.check().map_err(err)?;
        cfg.storage.check().map_err(err)?;
        crate::sync::config::check_all(&cfg.sync).map_err(err)?;
        for j in &cfg.sync {
            if let Some(expr) = &j.schedule {
                crate::jobs::parse_schedule(expr).map_err(|e| err(format!("[[sync]] {}: {e}", j.name)))?;
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
