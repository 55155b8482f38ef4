//! Per-host access tokens, kept in `DATA/tokens.json` (not in RocksDB) so
//! that `bkp-server token ...` works while `serve` holds the database.
//! Only a blake3 hash of each token is stored; a token is 256 random bits,
//! so a plain hash is enough (no password stretching needed).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bkp_common::names::check_host;
use bkp_common::protocol::Role;
use rand::RngCore;
use serde::{Deserialize, Serialize};

const FILE: &str = "tokens.json";
const LOCK: &str = "tokens.lock";
const FORMAT: &str = "bkp-tokens";
const VERSION: u32 = 1;
const MAX_FILE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {0}: {1}")]
    Io(String, std::io::Error),
    #[error("token file {0} is damaged ({1}); restore it from a backup or recreate the tokens")]
    Format(String, String),
    #[error("no token with id {0:?}; see `bkp-server token list`")]
    NotFound(String),
    #[error(transparent)]
    Name(#[from] bkp_common::names::NameError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short public id, for `list` and `revoke`.
    pub id: String,
    pub host: String,
    pub role: Role,
    /// blake3 of the token, hex.
    pub hash: String,
    /// Unix seconds.
    pub created: u64,
}

#[derive(Serialize, Deserialize)]
struct TokenFile {
    format: String,
    version: u32,
    tokens: Vec<TokenRecord>,
}

pub struct Tokens {
    dir: PathBuf,
}

fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

impl Tokens {
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.to_path_buf() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The token file, for a server that watches it for revocations.
    pub fn file(&self) -> PathBuf {
        self.path()
    }

    fn io(&self, e: std::io::Error) -> TokenError {
        TokenError::Io(self.path().display().to_string(), e)
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let path = self.path();
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let fmt_err = |m: String| TokenError::Format(path.display().to_string(), m);
        if len > MAX_FILE {
            return Err(fmt_err(format!("{len} bytes is too large")));
        }
        let bytes = fs::read(&path).map_err(|e| self.io(e))?;
        let f: TokenFile = serde_json::from_slice(&bytes).map_err(|e| fmt_err(e.to_string()))?;
        if f.format != FORMAT || f.version != VERSION {
            return Err(fmt_err(format!("format {} version {}", f.format, f.version)));
        }
        Ok(f.tokens)
    }

    /// Runs `change` on the token list under an exclusive lock and writes
    /// the result atomically (temp file, fsync, rename).
    fn update<T>(&self, change: impl FnOnce(&mut Vec<TokenRecord>) -> Result<T, TokenError>) -> Result<T, TokenError> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(LOCK))
            .map_err(|e| self.io(e))?;
        // Released when `lock` drops.
        lock.lock().map_err(|e| self.io(e))?;
        let mut tokens = self.list()?;
        let out = change(&mut tokens)?;
        let body = serde_json::to_vec_pretty(&TokenFile { format: FORMAT.into(), version: VERSION, tokens })
            .expect("serialize tokens");
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut f: File = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        f.write_all(&body).and_then(|_| f.sync_all()).map_err(|e| self.io(e))?;
        fs::rename(&tmp, self.path()).map_err(|e| self.io(e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| self.io(e))?;
        Ok(out)
    }

    /// Creates a token; the secret is returned once and never stored.
    pub fn create(&self, host: &str, role: Role) -> Result<(String, TokenRecord), TokenError> {
        check_host(host)?;
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = format!("bkp_{}", hex::encode(secret));
        let h = hash(&token);
        let rec = TokenRecord {
            id: h[..12].to_string(),
            host: host.to_string(),
            role,
            hash: h,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let r = rec.clone();
        self.update(move |t| {
            t.push(r);
            Ok(())
        })?;
        Ok((token, rec))
    }

    pub fn revoke(&self, id: &str) -> Result<TokenRecord, TokenError> {
        self.update(|t| {
            let pos = t.iter().position(|r| r.id == id).ok_or_else(|| TokenError::NotFound(id.to_string()))?;
            Ok(t.remove(pos))
        })
    }

    /// The record for a presented token, read fresh from disk so that a
    /// revocation takes effect on the next connection.
    pub fn authenticate(&self, token: &str) -> Result<Option<TokenRecord>, TokenError> {
        let h = hash(token);
        Ok(self.list()?.into_iter().find(|r| r.hash == h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_auth_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(dir.path());
        let (tok, rec) = t.create("web01", Role::Push).unwrap();
        assert!(!fs::read_to_string(dir.path().join(FILE)).unwrap().contains(&tok));
        assert_eq!(t.authenticate(&tok).unwrap().unwrap().host, "web01");
        assert!(t.authenticate("bkp_nope").unwrap().is_none());
        assert_eq!(t.list().unwrap().len(), 1);
        t.revoke(&rec.id).unwrap();
        assert!(t.authenticate(&tok).unwrap().is_none());
        assert!(matches!(t.revoke(&rec.id), Err(TokenError::NotFound(_))));
        assert!(t.create("bad/host", Role::Push).is_err());
        fs::write(dir.path().join(FILE), b"{garbage").unwrap();
        assert!(matches!(t.list(), Err(TokenError::Format(..))));
    }
}
