//! `[storage]` in server.toml: where chunk data lives.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default pack size: restic's and rustic's range (16-32 MiB), one PUT
/// per 32 MiB of new data.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;
/// Bounds on `pack_size`. Below 1 MiB a push costs a PUT per few chunks
/// (the point of packing is lost); above 1 GiB a pack is held in memory
/// while it is built and uploaded.
pub const MIN_PACK_SIZE: u64 = 1 << 20;
pub const MAX_PACK_SIZE: u64 = 1 << 30;
pub const DEFAULT_CACHE_SIZE: u64 = 4 << 30;
/// Repack below half live: a repack then costs at most the bytes it frees.
pub const DEFAULT_REPACK_LIVE_PERCENT: u8 = 50;

/// A `[storage]` section that cannot work, and why (what to change).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageConfigError {
    #[error("[storage] backend = \"s3\" needs `bucket`")]
    NoBucket,
    #[error("[storage] pack_size {0} is outside {min} MiB ..= {max} MiB", min = MIN_PACK_SIZE >> 20, max = MAX_PACK_SIZE >> 20)]
    PackSize(u64),
    #[error("[storage] retry_secs {0} is outside 1..=3600")]
    RetrySecs(u64),
    #[error("[storage] repack_live_percent {0} is over 100")]
    RepackPercent(u8),
    #[error("[storage] endpoint {0:?} must start with https:// or http://")]
    Endpoint(String),
    #[error("[storage] prefix {0:?}: no leading '/', empty or '..' parts")]
    Prefix(String),
    #[error(
        "[storage] backend = \"s3\" needs credentials: set credentials_file, or AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY in the server's environment"
    )]
    NoCredentials,
    #[error("credentials_file {path}: {problem}")]
    CredentialsFile { path: String, problem: CredentialsProblem },
}

/// What is wrong with a credentials file. Never quotes a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsProblem {
    #[error("{0}")]
    Io(String),
    #[error("mode {0:04o}: others may read the secret; `chmod 600` it and start again")]
    Mode(u32),
    #[error("{0} bytes: not a credentials file")]
    Size(u64),
    #[error("line {0}: expected `key = value`")]
    Line(usize),
    #[error("line {0}: unknown key {1:?}")]
    UnknownKey(usize, String),
    #[error("needs aws_access_key_id and aws_secret_access_key")]
    Incomplete,
}

/// A size that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?}: expected a number and a unit, like \"32 MiB\"")]
    Number(String),
    #[error("size {0:?}: unknown unit (B, KiB, MiB, GiB, TiB)")]
    Unit(String),
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Chunk data in the server's RocksDB (DATA/db).
    #[default]
    Local,
    /// Chunk data in packs in an S3-compatible bucket; metadata local.
    S3,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    /// `https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:8333`, ...;
    /// unset: AWS's endpoint for `region`.
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    /// Every object name starts with it (one bucket, several servers).
    pub prefix: String,
    pub region: String,
    /// An AWS-style credentials file (`aws_access_key_id`,
    /// `aws_secret_access_key`, optional `aws_session_token`; a
    /// `[default]` section or none), mode 0600. Unset: the
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment.
    pub credentials_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust beside the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Local cache of data ranges read from the bucket; unset: DATA/cache.
    pub cache_dir: Option<PathBuf>,
    #[serde(deserialize_with = "size")]
    pub cache_size: u64,
    #[serde(deserialize_with = "size")]
    pub pack_size: u64,
    /// GC copies the live chunks of a pack with less than this percentage
    /// of its bytes live into new packs (and deletes the old one at the
    /// next GC); a pack with none live is deleted at once.
    pub repack_live_percent: u8,
    /// How long one bucket call is retried (with backoff) before it fails
    /// and the push or job that made it fails with the bucket's error.
    pub retry_secs: u64,
    /// The `bucket` alert fires once the bucket has not answered this long.
    pub unreachable_alert_secs: u64,
    /// Sign each request's body hash (SigV4 `x-amz-content-sha256`) rather
    /// than send `UNSIGNED-PAYLOAD`. Off by default: both ends would hash
    /// every byte once more (measured: SeaweedFS's CPU was what bounded a
    /// push), while a pack is named by its blake3 and every blob is checked
    /// on every read and by the scrub, and TLS protects what travels. Turn
    /// it on for a store that refuses unsigned bodies.
    pub sign_payload: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            endpoint: None,
            bucket: None,
            prefix: String::new(),
            region: "us-east-1".into(),
            credentials_file: None,
            ca_file: None,
            cache_dir: None,
            cache_size: DEFAULT_CACHE_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            repack_live_percent: DEFAULT_REPACK_LIVE_PERCENT,
            retry_secs: 120,
            unreachable_alert_secs: 300,
            sign_payload: false,
        }
    }
}

impl StorageConfig {
    /// What can be checked without touching the network or the files it names.
    pub fn check(&self) -> Result<(), StorageConfigError> {
        use StorageConfigError as E;
        if self.backend == Backend::Local {
            return Ok(());
        }
        if self.bucket.as_deref().is_none_or(str::is_empty) {
            return Err(E::NoBucket);
        }
        if !(MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&self.pack_size) {
            return Err(E::PackSize(self.pack_size));
        }
        if !(1..=3600).contains(&self.retry_secs) {
            return Err(E::RetrySecs(self.retry_secs));
        }
        if self.repack_live_percent > 100 {
            return Err(E::RepackPercent(self.repack_live_percent));
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("https://") || e.starts_with("http://")) {
                return Err(E::Endpoint(e.clone()));
            }
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") || self.prefix.contains("..") {
            return Err(E::Prefix(self.prefix.clone()));
        }
        Ok(())
    }

    /// The credentials to sign requests with (see `credentials_file`).
    pub fn credentials(&self) -> Result<Credentials, StorageConfigError> {
        match &self.credentials_file {
            Some(p) => Credentials::from_file(p),
            None => {
                let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
                    (Some(key_id), Some(secret)) => Ok(Credentials { key_id, secret, token: var("AWS_SESSION_TOKEN") }),
                    _ => Err(StorageConfigError::NoCredentials),
                }
            }
        }
    }
}

/// Bucket credentials. Debug never shows the secret or the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Credentials files are small; a bigger one is not one.
const MAX_CREDENTIALS_FILE: u64 = 64 << 10;

impl Credentials {
    /// Reads an AWS-style credentials file, refusing one that others than
    /// its owner may read or write (the secret would be theirs too).
    pub fn from_file(path: &Path) -> Result<Self, StorageConfigError> {
        use std::os::unix::fs::MetadataExt;
        use CredentialsProblem as P;
        let fail = |problem| StorageConfigError::CredentialsFile { path: path.display().to_string(), problem };
        let md = std::fs::metadata(path).map_err(|e| fail(P::Io(e.to_string())))?;
        if md.mode() & 0o077 != 0 {
            return Err(fail(P::Mode(md.mode() & 0o7777)));
        }
        if md.len() > MAX_CREDENTIALS_FILE {
            return Err(fail(P::Size(md.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(P::Io(e.to_string())))?;
        Self::parse(&text).map_err(fail)
    }

    /// `key = value` lines of the `[default]` section (or of no section);
    /// `#`/`;` comments. Errors never quote a value.
    fn parse(text: &str) -> Result<Self, CredentialsProblem> {
        let (mut key_id, mut secret, mut token) = (None, None, None);
        let mut in_default = true;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                in_default = section.trim() == "default";
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(CredentialsProblem::Line(n + 1));
            };
            if !in_default {
                continue;
            }
            let v = v.trim().trim_matches('"').to_string();
            match k.trim() {
                "aws_access_key_id" => key_id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                other => return Err(CredentialsProblem::UnknownKey(n + 1, other.to_string())),
            }
        }
        match (key_id, secret) {
            (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => {
                Ok(Self { key_id, secret, token })
            }
            _ => Err(CredentialsProblem::Incomplete),
        }
    }
}

/// A size: bytes as an integer, or a string with a unit ("32 MiB", "4GiB",
/// "512k"; binary units).
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeError::Number(s.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(SizeError::Unit(s.to_string())),
    };
    n.checked_mul(1 << shift).ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<StorageConfig, String> {
        let c: StorageConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check().map(|()| c).map_err(|e| e.to_string())
    }

    #[test]
    fn local_by_default_and_s3_needs_a_bucket() {
        assert_eq!(cfg("").unwrap(), StorageConfig::default());
        assert_eq!(StorageConfig::default().backend, Backend::Local);
        assert_eq!(StorageConfig::default().pack_size, 32 << 20);
        let e = cfg("backend = \"s3\"").unwrap_err();
        assert!(e.contains("needs `bucket`"), "{e}");
        let c = cfg("backend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:8333\"\nprefix = \"srv1\"\n\
                     pack_size = \"8 MiB\"\ncache_size = 1073741824")
        .unwrap();
        assert_eq!((c.backend, c.pack_size, c.cache_size), (Backend::S3, 8 << 20, 1 << 30));
        assert!(cfg("backend = \"s4\"").is_err());
        assert!(cfg("backend = \"s3\"\nbucket = \"b\"\npack_size = \"512KiB\"").unwrap_err().contains("pack_size"));
        assert!(cfg("backend = \"s3\"\nbucket = \"b\"\npack_size = \"2GiB\"").unwrap_err().contains("pack_size"));
        assert!(cfg("backend = \"s3\"\nbucket = \"b\"\nendpoint = \"127.0.0.1:8333\"").unwrap_err().contains("http"));
        assert!(cfg("backend = \"s3\"\nbucket = \"b\"\nprefix = \"../x\"").unwrap_err().contains("prefix"));
        assert!(cfg("bucket = \"b\"\nsecret = \"x\"").is_err(), "unknown keys are refused");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32 MiB"), Ok(32 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("99999999999 TiB").is_err());
    }

    #[test]
    fn credentials_file_must_be_private_and_is_never_shown() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds");
        let secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY";
        std::fs::write(&p, format!("# bkp\n[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = {secret}\n[other]\naws_access_key_id = NOPE\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        assert!(!e.contains(secret));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::from_file(&p).unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str(), c.token.as_deref()), ("AKIDEXAMPLE", secret, None));
        assert!(!format!("{c:?}").contains(secret), "Debug hides the secret");
        std::fs::write(&p, format!("aws_secret_access_key = {secret}\n")).unwrap();
        let e = Credentials::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("aws_access_key_id") && !e.contains(secret), "{e}");
        std::fs::write(&p, format!("aws_secret = {secret}\n")).unwrap();
        let e = Credentials::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("unknown key") && !e.contains(secret), "{e}");
        let s3 = StorageConfig { credentials_file: Some(dir.path().join("absent")), ..Default::default() };
        assert!(s3.credentials().unwrap_err().to_string().contains("absent"));
    }
}
