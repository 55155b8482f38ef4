//! The s3 backend's own rows (`chunk_loc`, `packs`) and object names:
//! below both the backend and its upload task, so neither imports the
//! other for them.

use crate::store::object::ObjectError;
use crate::store::pack::{Kind, PackId};
use crate::store::StoreError;

/// An object store error as the store reports it: with the bucket's name,
/// which the client is told (the object names stay in the server's log).
pub(super) fn obj_err(bucket: &str, e: ObjectError) -> StoreError {
    StoreError::Bucket { bucket: bucket.to_string(), detail: e.to_string() }
}

/// A chunk's place: pack number, offset of its blob, its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
}

const LOC_VERSION: u8 = 1;
const PACK_VERSION: u8 = 1;

impl Location {
    pub fn encode(&self) -> [u8; 21] {
        let mut b = [0u8; 21];
        b[0] = LOC_VERSION;
        b[1..9].copy_from_slice(&self.pack.to_le_bytes());
        b[9..17].copy_from_slice(&self.offset.to_le_bytes());
        b[17..21].copy_from_slice(&self.len.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 21 || b[0] != LOC_VERSION {
            return None;
        }
        Some(Self {
            pack: u64::from_le_bytes(b[1..9].try_into().ok()?),
            offset: u64::from_le_bytes(b[9..17].try_into().ok()?),
            len: u32::from_le_bytes(b[17..21].try_into().ok()?),
        })
    }
}

/// A `packs` row: the uploaded pack a number stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackRecord {
    pub id: PackId,
    pub kind: Kind,
    pub len: u64,
}

impl PackRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(42);
        b.push(PACK_VERSION);
        b.push(self.kind as u8);
        b.extend_from_slice(&self.id.0);
        b.extend_from_slice(&self.len.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 42 || b[0] != PACK_VERSION {
            return None;
        }
        let kind = match b[1] {
            1 => Kind::Data,
            2 => Kind::Tree,
            _ => return None,
        };
        Some(Self { id: PackId(b[2..34].try_into().ok()?), kind, len: u64::from_le_bytes(b[34..42].try_into().ok()?) })
    }
}

pub fn pack_object(id: &PackId) -> String {
    format!("packs/{}", id.to_hex())
}
