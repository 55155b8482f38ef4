//! Sealed (client-side encrypted) chunk blobs: their layout, how their ids
//! are made, and the checks the server makes on them without the key.
//! The AEAD itself is the client's (`bkp_client::crypt`); the server never
//! links a cipher.
//!
//! ```text
//! offset size field
//! 0      4    magic "BKPC"
//! 4      1    version (1)
//! 5      1    codec 3 = sealed
//! 6      4    raw length of the chunk, u32 LE, at most MAX_CHUNK (claimed:
//!             the server cannot check it; the client does on opening)
//! 10     32   key hash K = blake3 keyed with the group's id key, of the plaintext
//! 42     32   ciphertext hash = blake3(id || bytes 0..42 || bytes 74..)
//! 74     24   nonce, random
//! 98     ..   XChaCha20-Poly1305(data key, nonce, inner blob, ad = AD_PREFIX || id),
//!             16-byte tag last; the inner blob is a plain blob (codec 0 or 2)
//!             of the plaintext: compressed, then sealed
//! ```
//!
//! The chunk id is `blake3::derive_key(ID_CONTEXT, K)`. Two checks follow,
//! both without the key, and the server makes them on upload, on every
//! read and on every scrub ([`check`]):
//! * the id is the hash of K. K is keyed by the group's secret, so only a
//!   holder of the plaintext *and* the key can name it: uploading the blob
//!   proves possession as re-hashing a plain chunk does, and no sealed
//!   upload can take the id of a plain chunk or of another group's chunk;
//! * the ciphertext hash: bit rot anywhere in the blob, or another chunk's
//!   blob returned under this id, fails it. The hash is the server's
//!   record of the ciphertext, kept in the blob itself, so every path
//!   that moves blobs (object store packs, a second site's copy, salvage)
//!   keeps it with no separate row that could get out of step.
//!
//! The client then opens the AEAD with the id as associated data and
//! checks K against the plaintext, so neither a server nor anyone who
//! writes to its disk can pass one chunk off as another.

use crate::blob::{BlobError, HEADER_LEN};
use crate::ids::ChunkId;

pub const KEY_HASH_AT: usize = HEADER_LEN;
pub const CT_HASH_AT: usize = KEY_HASH_AT + 32;
pub const NONCE_AT: usize = CT_HASH_AT + 32;
pub const BODY_AT: usize = NONCE_AT + NONCE_LEN;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob has beyond the plain blob it seals.
pub const OVERHEAD: usize = BODY_AT + TAG_LEN;
/// Smallest sealed blob: an inner blob of an empty chunk.
pub const MIN_SEALED: usize = OVERHEAD + HEADER_LEN;
/// blake3 `derive_key` context of a sealed chunk's id.
pub const ID_CONTEXT: &str = "bkp 2026-12-04 sealed chunk id";
/// Associated data of a chunk's AEAD: this, then the id.
pub const AD_PREFIX: &[u8] = b"bkp sealed chunk v1";

/// The id of the sealed chunk whose key hash is `k`.
pub fn id_of_key_hash(k: &[u8; 32]) -> ChunkId {
    ChunkId::from_bytes(blake3::derive_key(ID_CONTEXT, k))
}

/// The ciphertext hash of a sealed blob stored under `id` (the field
/// itself left out).
pub fn ciphertext_hash(id: &ChunkId, blob: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    h.update(&blob[..CT_HASH_AT]);
    h.update(&blob[NONCE_AT..]);
    *h.finalize().as_bytes()
}

/// The key hash field of a sealed blob (at least [`MIN_SEALED`] bytes).
pub fn key_hash(blob: &[u8]) -> [u8; 32] {
    blob[KEY_HASH_AT..CT_HASH_AT].try_into().expect("32 bytes")
}

/// Writes the ciphertext hash of a blob whose other fields are final.
pub fn finish(id: &ChunkId, blob: &mut [u8]) {
    let h = ciphertext_hash(id, blob);
    blob[CT_HASH_AT..NONCE_AT].copy_from_slice(&h);
}

/// The server's checks of a sealed blob under `id` (see the module doc);
/// its header must already be valid. Returns the claimed raw length.
pub fn check(blob: &[u8], id: &ChunkId, raw_len: u32) -> Result<u32, BlobError> {
    if blob.len() < MIN_SEALED {
        return Err(BlobError::Short(blob.len()));
    }
    let named = id_of_key_hash(&key_hash(blob));
    if named != *id {
        return Err(BlobError::Hash { got: named, want: *id });
    }
    if ciphertext_hash(id, blob)[..] != blob[CT_HASH_AT..NONCE_AT] {
        return Err(BlobError::CiphertextHash(*id));
    }
    Ok(raw_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;

    /// A sealed blob with a fake body: the server's checks do not open it.
    fn fake(k: [u8; 32], body: &[u8]) -> (ChunkId, Vec<u8>) {
        let id = id_of_key_hash(&k);
        let mut b = b"BKPC\x01\x03\x05\x00\x00\x00".to_vec();
        b.extend_from_slice(&k);
        b.extend_from_slice(&[0; 32]);
        b.extend_from_slice(&[7; NONCE_LEN]);
        b.extend_from_slice(body);
        finish(&id, &mut b);
        (id, b)
    }

    #[test]
    fn server_checks_pass_and_catch_every_flipped_byte() {
        let (id, b) = fake([1; 32], &[9; 40]);
        assert_eq!(blob::check(&b, &id).unwrap(), blob::Checked { raw_len: 5, sealed: true });
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x20;
            assert!(blob::check(&bad, &id).is_err(), "flip at {i} passed");
        }
        // Another sealed chunk's blob under this id.
        let (_, other) = fake([2; 32], &[9; 40]);
        assert!(matches!(blob::check(&other, &id), Err(BlobError::Hash { .. })));
        // Plain decoding refuses it clearly.
        assert_eq!(blob::decode(&b), Err(BlobError::Sealed));
    }

    #[test]
    fn a_sealed_upload_cannot_take_a_plain_chunks_id() {
        let plain = ChunkId::of(b"somebody's file");
        let (_, b) = fake([3; 32], &[0; 40]);
        assert!(matches!(blob::check(&b, &plain), Err(BlobError::Hash { .. })));
        let (_, short) = fake([3; 32], &[0; 5]);
        assert!(matches!(blob::check(&short, &id_of_key_hash(&[3; 32])), Err(BlobError::Short(_))));
    }

    #[test]
    fn golden_id_and_hash() {
        // Fixes the derivation: a change here orphans every sealed chunk.
        let id = id_of_key_hash(&[0; 32]);
        assert_eq!(&id.to_hex()[..16], GOLDEN_ID_PREFIX);
        let (_, b) = fake([0; 32], &[]);
        assert_eq!(b.len(), BODY_AT);
        assert_eq!(&b[..10], b"BKPC\x01\x03\x05\x00\x00\x00");
    }

    const GOLDEN_ID_PREFIX: &str = "201d9bf3de972b9a";
}
