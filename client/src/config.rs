//! Where the client finds its server, the server's certificate, its
//! token and its metadata cache: flags, else environment, else
//! `~/.config/bkp/client.toml`, else `/etc/bkp/client.toml` (`--config` or
//! `BKP_CONFIG` name another).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How long a connect, or a request safe to repeat, keeps trying: long
/// enough to ride out a server restart or a reboot.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: Option<String>,
    pub fingerprint: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Directory of the per-set metadata caches.
    pub cache_dir: Option<PathBuf>,
    /// Upload rate limit of `bkp push` (`10M`, `2MiB`; bytes per second).
    pub limit_upload: Option<String>,
    /// How long to keep trying a server that does not answer ("5m", "90s").
    pub timeout: Option<String>,
    /// Key group whose key seals this host's pushes (client-side
    /// encryption); unset: pushes are not encrypted.
    pub encryption: Option<String>,
    /// The group's key file (default `~/.config/bkp/keys/GROUP.key`).
    pub key_file: Option<PathBuf>,
    /// Named backups, run by `bkp run NAME` / `bkp run --all`.
    #[serde(default)]
    pub backup: Vec<crate::backup_def::BackupDef>,
}

/// How the client checks the server's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// SHA-256 of the server certificate (printed by `bkp-server init`).
    Fingerprint(String),
    /// A PEM file of CA certificates.
    CaFile(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub server: String,
    pub trust: Trust,
    pub token: String,
    /// Connecting, and each request safe to repeat, is retried this long.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no {0} configured: pass {1}, set {2}, or put `{3}` in ~/.config/bkp/client.toml")]
    Missing(&'static str, &'static str, &'static str, &'static str),
    #[error("config file {0}: {1}")]
    File(String, String),
    #[error("token file {0}: {1}")]
    TokenFile(String, std::io::Error),
    #[error("fingerprint {0:?} is not 64 hex digits (the SHA-256 that `bkp-server init` printed)")]
    Fingerprint(String),
    #[error("{0}: {1}")]
    Rate(&'static str, String),
    #[error("timeout {0:?}: {1} (give a duration such as \"5m\" or \"90s\")")]
    Timeout(String, String),
}

/// A duration as the config and `--timeout` give it; at least a second.
pub fn parse_timeout(s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| ConfigError::Timeout(s.into(), e.to_string()))?;
    if d < Duration::from_secs(1) {
        return Err(ConfigError::Timeout(s.into(), "under a second".into()));
    }
    Ok(d)
}

/// The config file: `config_file`, else `BKP_CONFIG`, else the first of
/// `~/.config/bkp/client.toml` and `/etc/bkp/client.toml` that exists,
/// else empty. `BKP_CONFIG=/dev/null` reads no file at all, so a script
/// (or a test) is not changed by whatever a host keeps in `/etc/bkp`.
pub fn load(config_file: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let named = config_file.map(Path::to_path_buf).or_else(|| env("BKP_CONFIG").map(PathBuf::from));
    match named.as_deref() {
        Some(p) => load_file(p)?.ok_or_else(|| ConfigError::File(p.display().to_string(), "not found".into())),
        None => {
            let home = env("HOME").map(|h| PathBuf::from(h).join(".config/bkp/client.toml"));
            for p in home.into_iter().chain([PathBuf::from("/etc/bkp/client.toml")]) {
                if let Some(c) = load_file(&p)? {
                    return Ok(c);
                }
            }
            Ok(FileConfig::default())
        }
    }
}

fn load_file(path: &Path) -> Result<Option<FileConfig>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => toml::from_str(&t).map(Some).map_err(|e| ConfigError::File(path.display().to_string(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::File(path.display().to_string(), e.to_string())),
    }
}

pub fn normalize_fingerprint(s: &str) -> Result<String, ConfigError> {
    let hex: String = s.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(ConfigError::Fingerprint(s.to_string()))
    }
}

impl ClientConfig {
    /// Merges flags (`flags`) over the environment over the config file.
    pub fn resolve(flags: FileConfig, config_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::resolve_with_cache(flags, config_file).map(|(c, _)| c)
    }

    /// Also resolves the metadata cache directory: `cache_dir` (flag,
    /// `BKP_CACHE_DIR`, file), else `$XDG_CACHE_HOME/bkp/client`, else
    /// `~/.cache/bkp/client`; `None` without any of them.
    pub fn resolve_with_cache(
        flags: FileConfig,
        config_file: Option<&Path>,
    ) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let file = load(config_file)?;
        let timeout = match flags.timeout.as_deref().or(file.timeout.as_deref()) {
            Some(t) => parse_timeout(t)?,
            None => DEFAULT_TIMEOUT,
        };
        let cache_dir = flags
            .cache_dir
            .clone()
            .or_else(|| env("BKP_CACHE_DIR").map(PathBuf::from))
            .or(file.cache_dir.clone())
            .or_else(|| env("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("bkp/client")))
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache/bkp/client")));
        let server = flags.server.or_else(|| env("BKP_SERVER")).or(file.server).ok_or(ConfigError::Missing(
            "server",
            "--server",
            "BKP_SERVER",
            "server = \"host:7443\"",
        ))?;
        let trust = match (flags.fingerprint.or_else(|| env("BKP_FINGERPRINT")), flags.ca_file) {
            (Some(f), _) => Trust::Fingerprint(normalize_fingerprint(&f)?),
            (None, Some(ca)) => Trust::CaFile(ca),
            (None, None) => match (file.fingerprint, file.ca_file) {
                (Some(f), _) => Trust::Fingerprint(normalize_fingerprint(&f)?),
                (None, Some(ca)) => Trust::CaFile(ca),
                (None, None) => {
                    return Err(ConfigError::Missing(
                        "server fingerprint",
                        "--fingerprint",
                        "BKP_FINGERPRINT",
                        "fingerprint = \"...\"",
                    ))
                }
            },
        };
        let token_file = flags.token_file.or_else(|| env("BKP_TOKEN_FILE").map(PathBuf::from));
        let token = match (flags.token.or_else(|| env("BKP_TOKEN")), token_file) {
            (Some(t), _) => t,
            (None, Some(p)) => read_token(&p)?,
            (None, None) => match (file.token, file.token_file) {
                (Some(t), _) => t,
                (None, Some(p)) => read_token(&p)?,
                (None, None) => {
                    return Err(ConfigError::Missing("token", "--token-file", "BKP_TOKEN_FILE", "token_file = \"...\""))
                }
            },
        };
        Ok((Self { server, trust, token, timeout }, cache_dir))
    }
}

/// `bkp push`'s upload limit in bytes per second (0: none): the flag,
/// else `BKP_LIMIT_UPLOAD`, else `limit_upload` in the config file.
pub fn upload_limit(flag: Option<&str>, config_file: Option<&Path>) -> Result<u64, ConfigError> {
    let env = std::env::var("BKP_LIMIT_UPLOAD").ok().filter(|v| !v.is_empty());
    let (value, from) = match (flag, env) {
        (Some(f), _) => (Some(f.to_string()), "--limit-upload"),
        (None, Some(e)) => (Some(e), "BKP_LIMIT_UPLOAD"),
        (None, None) => (load(config_file)?.limit_upload, "limit_upload in the config file"),
    };
    match value {
        None => Ok(0),
        Some(v) => bkp_common::rate::parse_rate(&v).map_err(|e| ConfigError::Rate(from, e)),
    }
}

fn read_token(p: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(p)
        .map(|t| t.trim().to_string())
        .map_err(|e| ConfigError::TokenFile(p.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let h = "ab".repeat(32);
        assert_eq!(normalize_fingerprint(&h.to_uppercase()).unwrap(), h);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")).unwrap(), h);
        assert!(normalize_fingerprint("abc").is_err());
    }

    #[test]
    fn upload_limit_from_flag_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("client.toml");
        std::fs::write(&f, "limit_upload = \"2MiB\"\n").unwrap();
        assert_eq!(upload_limit(Some("500k"), Some(&f)).unwrap(), 500_000);
        if std::env::var_os("BKP_LIMIT_UPLOAD").is_none() {
            assert_eq!(upload_limit(None, Some(&f)).unwrap(), 2 << 20);
        }
        let e = upload_limit(Some("fast"), Some(&f)).unwrap_err().to_string();
        assert!(e.starts_with("--limit-upload: \"fast\" is not a rate"), "{e}");
    }

    /// The annotated example in /usr/share/doc/bkp/examples/: the keys
    /// it sets and the commented-out ones are all keys the client
    /// accepts, and its fingerprint has the form `init` prints.
    #[test]
    fn packaged_example_config_is_current() {
        let text = include_str!("../../packaging/examples/client.toml");
        let shipped: FileConfig = toml::from_str(text).unwrap();
        assert!(shipped.server.is_some() && shipped.token_file.is_some());
        normalize_fingerprint(shipped.fingerprint.as_deref().unwrap()).unwrap();
        let all: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all: FileConfig = toml::from_str(&all).unwrap();
        assert!(all.ca_file.is_some() && all.cache_dir.is_some());
        assert!(all.encryption.is_some() && all.key_file.is_some());
        bkp_common::rate::parse_rate(all.limit_upload.as_deref().unwrap()).unwrap();
        parse_timeout(all.timeout.as_deref().unwrap()).unwrap();
        // The annotated backup definitions: a tree and a dump, both valid.
        assert!(shipped.backup.len() >= 2, "{:?}", shipped.backup);
        for b in &shipped.backup {
            b.check().unwrap();
        }
        let tree = shipped.backup.iter().find(|b| !b.paths.is_empty()).unwrap();
        assert!(tree.one_file_system && tree.exclude_caches && !tree.exclude_if_present.is_empty());
        assert!(shipped.backup.iter().any(|b| !b.command.is_empty() && b.before.is_some()));
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_timeout("90s").unwrap(), Duration::from_secs(90));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").unwrap_err().to_string().contains("5m"));
    }
}
