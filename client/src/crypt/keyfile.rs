//! The key file: a group's master keys, raw (for cron) or sealed under a
//! passphrase with argon2id.
//!
//! ```text
//! file       = "BKPY" version:u8 (1) postcard(KeyFile)     at most MAX_KEY_FILE bytes
//! KeyFile    = group:String created_ns:u64 protection:Protection
//! Protection = 0 Raw { keys: [[u8;32]] }                    oldest first; the last seals new data
//!            | 1 Passphrase { salt:[u8;16] m_kib:u32 t_cost:u32 p_cost:u32 nonce:[u8;24] sealed:bytes }
//! sealed     = XChaCha20-Poly1305(argon2id(passphrase, salt, m_kib, t_cost, p_cost) -> 32 bytes,
//!                                 nonce, postcard([[u8;32]]), ad = "bkp key file v1" || group)
//! ```
//! The size is checked before the file is read, and the argon2 costs
//! before they are used, so a crafted file can neither make the client
//! allocate much nor spin for hours.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"BKPY";
pub const VERSION: u8 = 1;
pub const MAX_KEY_FILE: u64 = 64 << 10;
/// Keys one file may hold (one per rotation).
pub const MAX_KEYS: usize = 256;
const AD: &[u8] = b"bkp key file v1";

/// argon2id costs: memory in KiB, passes, lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Costs {
    pub m_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Costs {
    /// What `bkp key` writes: 64 MiB, 3 passes (about half a second on a
    /// server core; RFC 9106's second recommendation).
    pub const DEFAULT: Costs = Costs { m_kib: 64 << 10, t_cost: 3, p_cost: 1 };
    /// Most a file may ask for: 4 GiB, 64 passes, 16 lanes.
    const MAX: Costs = Costs { m_kib: 4 << 20, t_cost: 64, p_cost: 16 };
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protection {
    Raw {
        keys: Vec<[u8; 32]>,
    },
    Passphrase {
        salt: [u8; 16],
        m_kib: u32,
        t_cost: u32,
        p_cost: u32,
        nonce: [u8; 24],
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    pub group: String,
    pub created_ns: u64,
    pub protection: Protection,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {0}: {1}")]
    Io(String, std::io::Error),
    #[error("key file of {0} bytes exceeds the {MAX_KEY_FILE}-byte cap (not a bkp key file?)")]
    TooLarge(u64),
    #[error("not a bkp key file (bad magic)")]
    Magic,
    #[error("key file version {0} is not supported by this build; upgrade bkp")]
    Version(u8),
    #[error("key file does not decode: {0}")]
    Decode(String),
    #[error("key file is malformed: {0}")]
    Invalid(String),
    #[error("wrong passphrase for the key file of group {0:?}")]
    Passphrase(String),
    #[error(
        "the key file of group {0:?} is protected by a passphrase: set BKP_KEY_PASSPHRASE (or \
         BKP_KEY_PASSPHRASE_FILE), or run on a terminal"
    )]
    NeedPassphrase(String),
    #[error("key file {0} exists; not overwritten (a key once used is the only way to read its data)")]
    Exists(String),
}

impl KeyFile {
    pub fn raw(group: &str, keys: Vec<[u8; 32]>, created_ns: u64) -> Self {
        Self { group: group.into(), created_ns, protection: Protection::Raw { keys } }
    }

    pub fn needs_passphrase(&self) -> bool {
        matches!(self.protection, Protection::Passphrase { .. })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        postcard::to_extend(self, out).expect("postcard to Vec")
    }

    pub fn decode(b: &[u8]) -> Result<Self, KeyFileError> {
        if b.len() as u64 > MAX_KEY_FILE {
            return Err(KeyFileError::TooLarge(b.len() as u64));
        }
        if b.len() < 5 || &b[..4] != MAGIC {
            return Err(KeyFileError::Magic);
        }
        if b[4] != VERSION {
            return Err(KeyFileError::Version(b[4]));
        }
        let (f, rest): (KeyFile, _) =
            postcard::take_from_bytes(&b[5..]).map_err(|e| KeyFileError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(KeyFileError::Decode(format!("{} bytes after the record", rest.len())));
        }
        f.check()?;
        Ok(f)
    }

    fn check(&self) -> Result<(), KeyFileError> {
        bkp_common::names::check_set_name(&self.group)
            .map_err(|e| KeyFileError::Invalid(format!("group name: {e}")))?;
        match &self.protection {
            Protection::Raw { keys } if keys.is_empty() || keys.len() > MAX_KEYS => {
                Err(KeyFileError::Invalid(format!("{} keys (1 to {MAX_KEYS})", keys.len())))
            }
            Protection::Passphrase { m_kib, t_cost, p_cost, .. }
                if !(8..=Costs::MAX.m_kib).contains(m_kib)
                    || !(1..=Costs::MAX.t_cost).contains(t_cost)
                    || !(1..=Costs::MAX.p_cost).contains(p_cost) =>
            {
                Err(KeyFileError::Invalid(format!("argon2 costs m={m_kib} KiB t={t_cost} p={p_cost} out of bounds")))
            }
            _ => Ok(()),
        }
    }

    /// The master keys, oldest first.
    pub fn unlock(&self, passphrase: Option<&str>) -> Result<Vec<[u8; 32]>, KeyFileError> {
        match &self.protection {
            Protection::Raw { keys } => Ok(keys.clone()),
            Protection::Passphrase { salt, m_kib, t_cost, p_cost, nonce, sealed } => {
                let pass = passphrase.ok_or_else(|| KeyFileError::NeedPassphrase(self.group.clone()))?;
                let costs = Costs { m_kib: *m_kib, t_cost: *t_cost, p_cost: *p_cost };
                let cipher = wrapping_cipher(pass, salt, costs)?;
                if sealed.len() < 16 {
                    return Err(KeyFileError::Invalid("sealed keys too short".into()));
                }
                let (body, tag) = sealed.split_at(sealed.len() - 16);
                let mut plain = body.to_vec();
                let tag = Tag::try_from(tag).expect("16 bytes");
                cipher
                    .decrypt_inout_detached(&XNonce::from(*nonce), &ad(&self.group), (&mut plain[..]).into(), &tag)
                    .map_err(|_| KeyFileError::Passphrase(self.group.clone()))?;
                let keys: Vec<[u8; 32]> =
                    postcard::from_bytes(&plain).map_err(|e| KeyFileError::Decode(e.to_string()))?;
                if keys.is_empty() || keys.len() > MAX_KEYS {
                    return Err(KeyFileError::Invalid(format!("{} keys", keys.len())));
                }
                Ok(keys)
            }
        }
    }

    /// This file's keys, sealed under `passphrase` (a fresh salt and nonce).
    pub fn protect(&self, keys: &[[u8; 32]], passphrase: &str, costs: Costs) -> Result<Self, KeyFileError> {
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = wrapping_cipher(passphrase, &salt, costs)?;
        let mut sealed = postcard::to_allocvec(keys).expect("postcard to Vec");
        let tag = cipher
            .encrypt_inout_detached(&XNonce::from(nonce), &ad(&self.group), (&mut sealed[..]).into())
            .expect("a few keys are far below the length limit");
        sealed.extend_from_slice(&tag);
        let Costs { m_kib, t_cost, p_cost } = costs;
        Ok(Self {
            group: self.group.clone(),
            created_ns: self.created_ns,
            protection: Protection::Passphrase { salt, m_kib, t_cost, p_cost, nonce, sealed },
        })
    }
}

fn ad(group: &str) -> Vec<u8> {
    [AD, group.as_bytes()].concat()
}

fn wrapping_cipher(passphrase: &str, salt: &[u8; 16], c: Costs) -> Result<XChaCha20Poly1305, KeyFileError> {
    let params = argon2::Params::new(c.m_kib, c.t_cost, c.p_cost, Some(32))
        .map_err(|e| KeyFileError::Invalid(format!("argon2 costs: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    a.hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .map_err(|e| KeyFileError::Invalid(format!("argon2: {e}")))?;
    Ok(XChaCha20Poly1305::new(&key.into()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |e| KeyFileError::Io(path.display().to_string(), e)
}

/// Reads a key file, its size checked before its bytes are.
pub fn read(path: &Path) -> Result<KeyFile, KeyFileError> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge(len));
    }
    let mut b = Vec::with_capacity(len as usize);
    f.take(MAX_KEY_FILE + 1).read_to_end(&mut b).map_err(io(path))?;
    KeyFile::decode(&b)
}

/// Writes a key file with mode 0600: a new one (`replace` false: never
/// over an existing file), or in place of the old one, atomically (a
/// crash leaves the old or the new, never half of one).
pub fn write(path: &Path, f: &KeyFile, replace: bool) -> Result<(), KeyFileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    if !replace && path.exists() {
        return Err(KeyFileError::Exists(path.display().to_string()));
    }
    let tmp = PathBuf::from(format!("{}.tmp{}", path.display(), std::process::id()));
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    let done = out
        .write_all(&f.encode())
        .and_then(|_| out.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .and_then(|_| out.sync_all());
    let done = done.and_then(|_| {
        if replace {
            std::fs::rename(&tmp, path)
        } else {
            // Refuses a file that appeared meanwhile.
            std::fs::hard_link(&tmp, path).and_then(|_| std::fs::remove_file(&tmp))
        }
    });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists(path.display().to_string())
        } else {
            io(path)(e)
        });
    }
    Ok(())
}

/// A fresh master key.
pub fn new_master() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Costs = Costs { m_kib: 8, t_cost: 1, p_cost: 1 };

    #[test]
    fn golden_bytes_of_a_raw_file() {
        let f = KeyFile::raw("g", vec![[7; 32]], 1);
        let b = f.encode();
        let mut want = b"BKPY\x01\x01g\x01\x00\x01".to_vec();
        want.extend_from_slice(&[7; 32]);
        assert_eq!(b, want);
        assert_eq!(KeyFile::decode(&b).unwrap(), f);
    }

    #[test]
    fn passphrase_round_trip_and_wrong_passphrase() {
        let keys = vec![[1; 32], [2; 32]];
        let f = KeyFile::raw("db-hosts", keys.clone(), 5).protect(&keys, "correct horse", FAST).unwrap();
        let b = f.encode();
        assert!(!b.windows(32).any(|w| w == [1; 32] || w == [2; 32]), "the keys are not in the file in clear");
        let back = KeyFile::decode(&b).unwrap();
        assert!(back.needs_passphrase());
        assert_eq!(back.unlock(Some("correct horse")).unwrap(), keys);
        assert!(matches!(back.unlock(Some("wrong")), Err(KeyFileError::Passphrase(_))));
        assert!(matches!(back.unlock(None), Err(KeyFileError::NeedPassphrase(_))));
        // The group is bound: renaming it in the file breaks the seal.
        let mut renamed = back.clone();
        renamed.group = "db-hostz".into();
        assert!(matches!(renamed.unlock(Some("correct horse")), Err(KeyFileError::Passphrase(_))));
    }

    #[test]
    fn rejects_bad_files() {
        assert!(matches!(KeyFile::decode(b"BKP"), Err(KeyFileError::Magic)));
        assert!(matches!(KeyFile::decode(b"XXXX\x01"), Err(KeyFileError::Magic)));
        assert!(matches!(KeyFile::decode(b"BKPY\x02"), Err(KeyFileError::Version(2))));
        assert!(matches!(KeyFile::decode(&vec![0; 70_000]), Err(KeyFileError::TooLarge(_))));
        let mut b = KeyFile::raw("g", vec![[7; 32]], 1).encode();
        b.push(0);
        assert!(matches!(KeyFile::decode(&b), Err(KeyFileError::Decode(_))));
        assert!(matches!(KeyFile::decode(&KeyFile::raw("g", vec![], 1).encode()), Err(KeyFileError::Invalid(_))));
        assert!(matches!(
            KeyFile::decode(&KeyFile::raw("../x", vec![[0; 32]], 1).encode()),
            Err(KeyFileError::Invalid(_))
        ));
        // Costs that would spin for hours are refused before argon2 runs.
        let f = KeyFile::raw("g", vec![[7; 32]], 1).protect(&[[7; 32]], "p", FAST).unwrap();
        let Protection::Passphrase { salt, nonce, sealed, .. } = f.protection.clone() else { unreachable!() };
        let greedy = KeyFile {
            protection: Protection::Passphrase { salt, m_kib: 8, t_cost: 1_000_000, p_cost: 1, nonce, sealed },
            ..f
        };
        assert!(matches!(KeyFile::decode(&greedy.encode()), Err(KeyFileError::Invalid(_))));
    }

    #[test]
    fn written_with_mode_0600_and_never_over_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys/g.key");
        let f = KeyFile::raw("g", vec![new_master()], 1);
        write(&p, &f, false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&p).unwrap(), f);
        let other = KeyFile::raw("g", vec![new_master()], 2);
        assert!(matches!(write(&p, &other, false), Err(KeyFileError::Exists(_))));
        assert_eq!(read(&p).unwrap(), f, "the first key is kept");
        write(&p, &other, true).unwrap();
        assert_eq!(read(&p).unwrap(), other);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
