//! Snapshot record objects: every commit writes `snapshots/<id hex>` to
//! the bucket (create-only) after its packs are stored and before its
//! local batch, so a bucket holds every acknowledged snapshot and
//! `rebuild` can bring a server back from the bucket alone.
//!
//! ```text
//! offset size field
//! 0      4    magic "BKPR"
//! 4      1    version (1)
//! 5      3    zero
//! 8      4    record length u32 LE (at most MAX_RECORD_OBJECT)
//! 12     ..   the snapshot record, as the local `snapshots` row holds it
//!             (bkp_common::snapshot, "BKPS"); its blake3 is the id
//! ```
//! A record whose commit failed after its PUT (the local batch did not
//! land) and the record of a snapshot forgotten or pruned whose delete did
//! not reach the bucket are stale: GC deletes those no local snapshot
//! names, under the fence (no commit between its PUT and its batch then).
//! The protected flag is not kept here: a rebuilt server has every
//! snapshot unprotected (`bkp protect` again).

use std::collections::HashSet;

use bkp_common::SnapshotId;
use bytes::Bytes;

use super::S3Chunks;
use crate::store::{schema, Fence, StoreError};

pub const MAGIC: &[u8; 4] = b"BKPR";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
/// A snapshot record holds at most the tree's chunk list (well under this).
pub const MAX_RECORD_OBJECT: usize = 64 << 20;

pub fn record_object(id: &SnapshotId) -> String {
    format!("snapshots/{}", id.to_hex())
}

pub fn encode(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + record.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a bkp snapshot record object (bad magic)")]
    Magic,
    #[error("snapshot record object version {0} is not 1: written by a newer bkp-server; upgrade this one")]
    Version(u8),
    #[error("snapshot record object is damaged: {0}")]
    Damaged(String),
}

/// The snapshot record inside an object, checked against the id its name
/// gives.
pub fn decode<'a>(b: &'a [u8], id: &SnapshotId) -> Result<&'a [u8], RecordError> {
    if b.len() < HEADER_LEN || &b[..4] != MAGIC {
        return Err(RecordError::Magic);
    }
    if b[4] != VERSION {
        return Err(RecordError::Version(b[4]));
    }
    let len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD_OBJECT || b.len() != HEADER_LEN + len {
        return Err(RecordError::Damaged(format!("length {len} for an object of {} bytes", b.len())));
    }
    let rec = &b[HEADER_LEN..];
    if SnapshotId::of(rec) != *id {
        return Err(RecordError::Damaged("does not hash to the id in its name".into()));
    }
    Ok(rec)
}

/// The id a `snapshots/` object name stands for.
pub fn parse_name(name: &str) -> Option<SnapshotId> {
    let hex = name.strip_prefix("snapshots/")?;
    let mut b = [0u8; 32];
    hex::decode_to_slice(hex, &mut b).ok()?;
    SnapshotId::from_slice(&b)
}

impl S3Chunks {
    pub(super) fn put_record(&self, id: &SnapshotId, record: &[u8]) -> Result<(), StoreError> {
        let (o, name, bytes) = (self.objects.clone(), record_object(id), Bytes::from(encode(record)));
        super::run_on(self.rt(), async move { o.put_new(&name, bytes).await })
            .map(|_| ())
            .map_err(|e| self.bucket_err(e))
    }

    pub(super) fn delete_record(&self, id: &SnapshotId) {
        let (o, name) = (self.objects.clone(), record_object(id));
        if let Err(e) = super::run_on(self.rt(), async move { o.delete(&[name]).await }) {
            tracing::warn!(snapshot = %id.short(), "snapshot record not deleted from the bucket (the next gc does): {e}");
        }
    }

    /// Deletes the record objects no local snapshot names; returns how many.
    pub(super) fn delete_stale_records(&self, fence: &Fence<'_>) -> Result<u64, StoreError> {
        let o = self.objects.clone();
        let listed =
            super::run_on(self.rt(), async move { o.list("snapshots").await }).map_err(|e| self.bucket_err(e))?;
        let mut stale = Vec::new();
        fence(&mut || {
            let cf = self.db.cf(schema::CF_SNAPSHOTS);
            let known: HashSet<String> = listed
                .iter()
                .filter_map(|(n, _)| parse_name(n).map(|id| (n, id)))
                .filter(|(_, id)| self.db.raw().get_pinned_cf(cf, id.as_bytes()).ok().flatten().is_some())
                .map(|(n, _)| n.clone())
                .collect();
            stale = listed.iter().map(|(n, _)| n.clone()).filter(|n| !known.contains(n)).collect();
            Ok(())
        })?;
        if stale.is_empty() {
            return Ok(0);
        }
        let count = stale.len() as u64;
        let o = self.objects.clone();
        super::run_on(self.rt(), async move { o.delete(&stale).await }).map_err(|e| self.bucket_err(e))?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_object_golden_and_checks() {
        let rec = b"BKPS\x01 a record".to_vec();
        let id = SnapshotId::of(&rec);
        let enc = encode(&rec);
        let mut want = b"BKPR\x01\x00\x00\x00".to_vec();
        want.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        want.extend_from_slice(&rec);
        assert_eq!(enc, want);
        assert_eq!(decode(&enc, &id).unwrap(), &rec[..]);
        assert_eq!(parse_name(&record_object(&id)), Some(id));
        assert_eq!(parse_name("snapshots/zz"), None);
        let mut bad = enc.clone();
        bad[4] = 2;
        assert_eq!(decode(&bad, &id), Err(RecordError::Version(2)));
        bad = enc.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&bad, &id), Err(RecordError::Damaged(_))));
        assert!(matches!(decode(&enc[..enc.len() - 1], &id), Err(RecordError::Damaged(_))));
        assert_eq!(decode(b"BKPX", &id), Err(RecordError::Magic));
        let mut huge = enc[..HEADER_LEN].to_vec();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge, &id), Err(RecordError::Damaged(_))));
    }
}
