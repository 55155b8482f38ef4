//! `[[sync]]` in server.toml: the jobs that pull another server's
//! snapshots into this one.

use std::path::PathBuf;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Deserializer};

/// One sync job, named by `name` (`bkp-server sync --remote NAME`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncJob {
    pub name: String,
    /// The primary's address, `host:port`.
    pub server: String,
    /// SHA-256 of the primary's certificate (what its `init` printed).
    pub fingerprint: String,
    /// A `sync` token of the primary (`bkp-server token create --role sync` there).
    pub token_file: PathBuf,
    /// Host globs (`web*`); empty: every host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Set name globs (`pg*`); empty: every set.
    #[serde(default)]
    pub names: Vec<String>,
    /// Five-field cron, UTC, as `[jobs]`; unset: only by hand.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Delete copies of snapshots the primary no longer has. Off by
    /// default: a primary's forget, prune or compromise never reaches here.
    #[serde(default)]
    pub remove_vanished: bool,
    /// Bytes per second of chunk data pulled (`"10M"`, `"2MiB"`, or a
    /// number); 0: no limit.
    #[serde(default, deserialize_with = "rate")]
    pub rate_limit: u64,
    /// A set whose newest copy is older than the primary's newest by more
    /// than this alerts (default a day).
    #[serde(default = "default_max_lag", with = "humantime_serde")]
    pub max_lag: Duration,
}

fn default_max_lag() -> Duration {
    Duration::from_secs(86_400)
}

fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Rate {
        Bytes(u64),
        Text(String),
    }
    match Rate::deserialize(d)? {
        Rate::Bytes(n) => Ok(n),
        Rate::Text(s) => bkp_common::rate::parse_rate(&s).map_err(serde::de::Error::custom),
    }
}

impl SyncJob {
    /// What `ServerConfig::load` refuses: a bad name, fingerprint, glob
    /// or address (the schedule it checks with `[jobs]`'s).
    pub fn check(&self) -> Result<(), String> {
        bkp_common::names::check_host(&self.name).map_err(|e| format!("[[sync]] name {:?}: {e}", self.name))?;
        let ctx = |m: String| format!("[[sync]] {}: {m}", self.name);
        self.fingerprint_hex().map_err(ctx)?;
        self.filters().map_err(ctx)?;
        if self.server.rsplit_once(':').is_none() {
            return Err(ctx(format!("server {:?} must be host:port", self.server)));
        }
        Ok(())
    }

    /// The fingerprint as 64 lowercase hex digits (colons and a
    /// `sha256:` prefix allowed, as the client takes it).
    pub fn fingerprint_hex(&self) -> Result<String, String> {
        bkp_client::config::normalize_fingerprint(&self.fingerprint).map_err(|e| e.to_string())
    }

    pub fn filters(&self) -> Result<Filters, String> {
        Ok(Filters { hosts: globs(&self.hosts, "hosts")?, names: globs(&self.names, "names")? })
    }

    /// Reads the token file (trimmed).
    pub fn token(&self) -> Result<String, String> {
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("token file {}: {e}", self.token_file.display()))
    }
}

fn globs(patterns: &[String], what: &str) -> Result<Option<GlobSet>, String> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("{what} glob {p:?}: {e}"))?);
    }
    b.build().map(Some).map_err(|e| format!("{what} globs: {e}"))
}

/// Which sets a job copies.
pub struct Filters {
    hosts: Option<GlobSet>,
    names: Option<GlobSet>,
}

impl Filters {
    pub fn matches(&self, host: &str, name: &str) -> bool {
        self.hosts.as_ref().is_none_or(|g| g.is_match(host)) && self.names.as_ref().is_none_or(|g| g.is_match(name))
    }
}

/// Checks the `[[sync]]` list as a whole: each job, and unique names.
pub fn check_all(jobs: &[SyncJob]) -> Result<(), String> {
    for (i, j) in jobs.iter().enumerate() {
        j.check()?;
        if jobs[..i].iter().any(|o| o.name == j.name) {
            return Err(format!("[[sync]] name {:?} is used twice", j.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> Result<SyncJob, String> {
        let fp = "ab".repeat(32);
        let text = format!(
            "name = \"offsite\"\nserver = \"backup1:7443\"\nfingerprint = \"{fp}\"\ntoken_file = \"/etc/bkp/sync.token\"\n{extra}"
        );
        let j: SyncJob = toml::from_str(&text).map_err(|e| e.to_string())?;
        j.check()?;
        Ok(j)
    }

    #[test]
    fn defaults_rates_and_filters() {
        let j = job("").unwrap();
        assert_eq!((j.rate_limit, j.remove_vanished, j.max_lag), (0, false, Duration::from_secs(86_400)));
        assert!(j.filters().unwrap().matches("any", "thing"));
        assert_eq!(job("rate_limit = \"10M\"").unwrap().rate_limit, 10_000_000);
        assert_eq!(job("rate_limit = 4096").unwrap().rate_limit, 4096);
        let j = job("hosts = [\"web*\"]\nnames = [\"pg*\", \"files\"]\nmax_lag = \"6h\"").unwrap();
        let f = j.filters().unwrap();
        assert!(f.matches("web01", "pgdump") && f.matches("web2", "files"));
        assert!(!f.matches("db01", "pgdump") && !f.matches("web01", "mysql"));
        assert_eq!(j.max_lag, Duration::from_secs(6 * 3600));
    }

    #[test]
    fn refuses_what_cannot_work() {
        assert!(job("rate_limit = \"fast\"").unwrap_err().contains("not a rate"));
        assert!(job("hosts = [\"[\"]").unwrap_err().contains("hosts glob"));
        assert!(job("hots = []").is_err());
        let bad_fp = "name = \"x\"\nserver = \"a:1\"\nfingerprint = \"abc\"\ntoken_file = \"/t\"";
        assert!(toml::from_str::<SyncJob>(bad_fp).unwrap().check().unwrap_err().contains("fingerprint"));
        let a = job("").unwrap();
        assert!(check_all(&[a.clone(), a]).unwrap_err().contains("used twice"));
    }
}
