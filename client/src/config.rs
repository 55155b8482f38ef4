//! Where the client finds its server, the server's certificate, its
//! token and its metadata cache: flags, else environment, else
//! `~/.config/bkp/client.toml`, else `/etc/bkp/client.toml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
        let file = find_file(config_file)?;
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
        Ok((Self { server, trust, token }, cache_dir))
    }
}

/// `config_file`, else the first of ~/.config/bkp/client.toml and
/// /etc/bkp/client.toml that exists, else an empty config.
fn find_file(config_file: Option<&Path>) -> Result<FileConfig, ConfigError> {
    if let Some(p) = config_file {
        return load_file(p)?.ok_or_else(|| ConfigError::File(p.display().to_string(), "not found".into()));
    }
    let home = std::env::var("HOME").ok().filter(|v| !v.is_empty());
    let home = home.map(|h| PathBuf::from(h).join(".config/bkp/client.toml"));
    for p in home.into_iter().chain([PathBuf::from("/etc/bkp/client.toml")]) {
        if let Some(c) = load_file(&p)? {
            return Ok(c);
        }
    }
    Ok(FileConfig::default())
}

/// `bkp push`'s upload limit in bytes per second (0: none): the flag,
/// else `BKP_LIMIT_UPLOAD`, else `limit_upload` in the config file.
pub fn upload_limit(flag: Option<&str>, config_file: Option<&Path>) -> Result<u64, ConfigError> {
    let env = std::env::var("BKP_LIMIT_UPLOAD").ok().filter(|v| !v.is_empty());
    let (value, from) = match (flag, env) {
        (Some(f), _) => (Some(f.to_string()), "--limit-upload"),
        (None, Some(e)) => (Some(e), "BKP_LIMIT_UPLOAD"),
        (None, None) => (find_file(config_file)?.limit_upload, "limit_upload in the config file"),
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
        bkp_common::rate::parse_rate(all.limit_upload.as_deref().unwrap()).unwrap();
    }
}
