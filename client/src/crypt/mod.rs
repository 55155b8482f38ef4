//! Client-side encryption per key group (issue 22; the formats are in
//! docs/FORMAT.md, "Encryption").
//!
//! A key group is the hosts that share one secret, the group's master key,
//! kept in a key file ([`keyfile`]). Everything else is derived from it
//! with blake3's `derive_key`, one context string per use, so no two uses
//! share a key:
//! * the **id key**: a data chunk's key hash K is blake3 keyed with it, and
//!   its id is `derive_key(seal::ID_CONTEXT, K)`. The server cannot confirm
//!   a guess of a file's content (it would need the key), and ids of
//!   another group, or plain ids, never match: dedup and possession stay
//!   inside a group, as they stay per host today;
//! * the **data key**: XChaCha20-Poly1305 over the compressed chunk, with a
//!   random 24-byte nonce and the chunk id as associated data, so a blob
//!   returned under another id does not open (`bkp_common::seal`);
//! * the **gear key**: the chunker's gear table, so chunk boundaries (which
//!   the server sees as sizes) do not fingerprint known files;
//! * the **key id**: 8 bytes that name the key in listings and on the paper
//!   form, without revealing it.
//!
//! The server never holds a key. It checks what it can without one (the
//! key hash against the id, the ciphertext hash) on upload, read and scrub.
//!
//! Tree chunks stay plain chunks in this build: the server reads their
//! lists of chunk ids for the commit check and GC. Sealing the names and
//! metadata inside them is the next step (docs/FORMAT.md says how).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bkp_common::blob::{self, BlobError, Codec, HEADER_LEN};
use bkp_common::chunker::{Gear, MAX_CHUNK};
use bkp_common::seal::{self, AD_PREFIX, BODY_AT, NONCE_AT, NONCE_LEN, TAG_LEN};
use bkp_common::ChunkId;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

pub mod commands;
pub mod keyfile;
pub mod paper;
pub mod setup;

/// Context strings of the keys derived from a group's master key. Changing
/// one orphans every chunk sealed with it.
const ID_KEY: &str = "bkp 2026-12-04 chunk id key";
const DATA_KEY: &str = "bkp 2026-12-04 chunk data key";
const GEAR_KEY: &str = "bkp 2026-12-04 chunker gear key";
const KEY_ID: &str = "bkp 2026-12-04 key id";

/// The keys derived from one master key.
pub struct Keys {
    id_key: [u8; 32],
    cipher: XChaCha20Poly1305,
    gear: &'static Gear,
    key_id: [u8; 8],
}

impl Keys {
    pub fn derive(master: &[u8; 32]) -> Self {
        let data_key = blake3::derive_key(DATA_KEY, master);
        let key_id = blake3::derive_key(KEY_ID, master)[..8].try_into().expect("8 bytes");
        Self {
            id_key: blake3::derive_key(ID_KEY, master),
            cipher: XChaCha20Poly1305::new(&data_key.into()),
            // One table per key a process loads: leaked, so chunkers can
            // hold it as `'static` like the public one.
            gear: Box::leak(Box::new(Gear::keyed(&blake3::derive_key(GEAR_KEY, master)))),
            key_id,
        }
    }

    /// What names this key in listings and on the paper form.
    pub fn key_id(&self) -> String {
        hex::encode(self.key_id)
    }

    /// The chunker's gear table for this key.
    pub fn gear(&self) -> &'static Gear {
        self.gear
    }

    /// The key hash K of a chunk's plaintext.
    pub fn key_hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    /// A chunk's id in this group.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        seal::id_of_key_hash(&self.key_hash(data))
    }

    /// Seals a chunk whose key hash `k` the caller computed: compressed
    /// with `encoder` first (ciphertext does not compress), then sealed
    /// with a random nonce.
    pub fn seal_with(&self, encoder: &mut blob::Encoder, k: &[u8; 32], data: &[u8]) -> (ChunkId, Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_nonce(encoder, k, data, nonce)
    }

    fn seal_nonce(
        &self,
        encoder: &mut blob::Encoder,
        k: &[u8; 32],
        data: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> (ChunkId, Vec<u8>) {
        let id = seal::id_of_key_hash(k);
        let inner = encoder.encode(data);
        let mut out = Vec::with_capacity(BODY_AT + inner.len() + TAG_LEN);
        out.extend_from_slice(blob::MAGIC);
        out.push(blob::VERSION);
        out.push(Codec::Sealed as u8);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&[0; 32]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&inner);
        drop(inner);
        let tag = self
            .cipher
            .encrypt_inout_detached(&XNonce::from(nonce), &ad(&id), (&mut out[BODY_AT..]).into())
            .expect("a chunk is far below XChaCha20's length limit");
        out.extend_from_slice(&tag);
        seal::finish(&id, &mut out);
        (id, out)
    }

    /// Seals a chunk (see [`Keys::seal_with`]).
    pub fn seal(&self, encoder: &mut blob::Encoder, data: &[u8]) -> (ChunkId, Vec<u8>) {
        self.seal_with(encoder, &self.key_hash(data), data)
    }

    /// Opens a sealed blob fetched as chunk `id`: its key hash against
    /// `id`, then the AEAD bound to `id`, then the plaintext against the
    /// key hash. The AEAD covers the ciphertext, so the ciphertext hash (a
    /// second pass over the blob) is only taken when it fails, to tell a
    /// damaged blob from a wrong key.
    pub fn open(&self, blob: &[u8], id: &ChunkId) -> Result<Vec<u8>, OpenError> {
        let h = blob::header(blob).map_err(OpenError::Blob)?;
        if h.codec != Codec::Sealed {
            return Err(OpenError::Blob(BlobError::Open("a plain chunk where a sealed one was expected".into())));
        }
        if blob.len() < seal::MIN_SEALED {
            return Err(OpenError::Blob(BlobError::Short(blob.len())));
        }
        let named = seal::id_of_key_hash(&seal::key_hash(blob));
        if named != *id {
            return Err(OpenError::Blob(BlobError::Hash { got: named, want: *id }));
        }
        let (body, tag) = blob[BODY_AT..].split_at(blob.len() - BODY_AT - TAG_LEN);
        let nonce: [u8; NONCE_LEN] = blob[NONCE_AT..BODY_AT].try_into().expect("24 bytes");
        let mut inner = body.to_vec();
        let tag = Tag::try_from(tag).expect("16 bytes");
        self.cipher.decrypt_inout_detached(&XNonce::from(nonce), &ad(id), (&mut inner[..]).into(), &tag).map_err(
            |_| match blob::check(blob, id) {
                Err(e) => OpenError::Blob(e),
                Ok(_) => OpenError::WrongKey(*id),
            },
        )?;
        let data = blob::decode(&inner).map_err(OpenError::Blob)?;
        if data.len() != h.raw_len as usize || data.len() > MAX_CHUNK as usize {
            return Err(OpenError::Blob(BlobError::Length { got: data.len(), want: h.raw_len as usize }));
        }
        if self.key_hash(&data) != seal::key_hash(blob) {
            return Err(OpenError::Blob(BlobError::Open(format!("chunk {id} opens to other content than its id"))));
        }
        Ok(data)
    }
}

fn ad(id: &ChunkId) -> Vec<u8> {
    [AD_PREFIX, id.as_bytes()].concat()
}

/// Why a sealed chunk did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Damaged, swapped, or not a sealed blob at all.
    #[error(transparent)]
    Blob(BlobError),
    /// Intact as the server stored it, but no key given opens it.
    #[error(
        "chunk {0} does not open with this key file: it was sealed with another key group's key (give that \
         group's key_file in client.toml), or the server returned another chunk under its id"
    )]
    WrongKey(ChunkId),
    #[error("chunk {0} is sealed (encrypted): set `encryption` and `key_file` in client.toml to read it")]
    NoKey(ChunkId),
    #[error("{0}")]
    Load(String),
}

/// A group's keys: the newest seals new data, every one opens.
pub struct Keyring {
    pub group: String,
    /// Oldest first.
    keys: Vec<Keys>,
}

impl Keyring {
    pub fn new(group: String, masters: &[[u8; 32]]) -> Self {
        assert!(!masters.is_empty(), "a keyring holds at least one key");
        Self { group, keys: masters.iter().map(Keys::derive).collect() }
    }

    /// The key that seals new data.
    pub fn current(&self) -> &Keys {
        self.keys.last().expect("at least one key")
    }

    pub fn keys(&self) -> &[Keys] {
        &self.keys
    }

    /// Opens a sealed blob with whichever key of the ring sealed it.
    pub fn open(&self, blob: &[u8], id: &ChunkId) -> Result<Vec<u8>, OpenError> {
        let mut last = OpenError::NoKey(*id);
        for k in self.keys.iter().rev() {
            match k.open(blob, id) {
                Err(OpenError::WrongKey(_)) => last = OpenError::WrongKey(*id),
                other => return other,
            }
        }
        Err(last)
    }
}

type Loader = Box<dyn Fn() -> Result<Keyring, String> + Send + Sync>;

static LOADER: OnceLock<Loader> = OnceLock::new();
static KEYRING: OnceLock<Result<Arc<Keyring>, String>> = OnceLock::new();

/// Installs how this process loads its keyring (the binary does, from
/// client.toml). It runs at the first sealed chunk a read meets, so a
/// restore of plain snapshots never asks for a passphrase.
pub fn install_loader(f: impl Fn() -> Result<Keyring, String> + Send + Sync + 'static) {
    let _ = LOADER.set(Box::new(f));
}

/// The process's keyring, loaded on first use; `None`: none configured.
pub fn keyring() -> Option<Result<Arc<Keyring>, String>> {
    if let Some(r) = KEYRING.get() {
        return Some(r.clone());
    }
    let loader = LOADER.get()?;
    Some(KEYRING.get_or_init(|| loader().map(Arc::new)).clone())
}

/// Makes `ring` the process's keyring (unless one was loaded already).
pub fn use_keyring(ring: Arc<Keyring>) {
    let _ = KEYRING.set(Ok(ring));
}

static SEALED_OPENED: AtomicU64 = AtomicU64::new(0);

/// Sealed chunks this process has opened (`bkp key check` reports them).
pub fn sealed_opened() -> u64 {
    SEALED_OPENED.load(Ordering::Relaxed)
}

/// Decodes a fetched blob of either kind and checks it against `id`:
/// plain ones as ever, sealed ones opened with the process's keyring.
pub fn decode_verified(blob: &[u8], id: &ChunkId) -> Result<Vec<u8>, OpenError> {
    if blob.len() < HEADER_LEN || blob[5] != Codec::Sealed as u8 {
        return blob::decode_verified(blob, id).map_err(OpenError::Blob);
    }
    match keyring() {
        None => Err(OpenError::NoKey(*id)),
        Some(Err(e)) => Err(OpenError::Load(e)),
        Some(Ok(ring)) => {
            let data = ring.open(blob, id)?;
            SEALED_OPENED.fetch_add(1, Ordering::Relaxed);
            Ok(data)
        }
    }
}

/// How a push names its data chunks.
#[derive(Clone, Default)]
pub enum ChunkIds {
    /// blake3 of the plaintext.
    #[default]
    Plain,
    /// Sealed with a group's current key.
    Sealed(Arc<Keyring>),
}

impl ChunkIds {
    pub fn of(&self, data: &[u8]) -> ChunkId {
        match self {
            ChunkIds::Plain => ChunkId::of(data),
            ChunkIds::Sealed(r) => r.current().chunk_id(data),
        }
    }

    pub fn sealed(&self) -> bool {
        matches!(self, ChunkIds::Sealed(_))
    }

    /// The gear table data is chunked with.
    pub fn gear(&self) -> &'static Gear {
        match self {
            ChunkIds::Plain => Gear::public(),
            ChunkIds::Sealed(r) => r.current().gear(),
        }
    }
}

#[cfg(test)]
mod tests;
