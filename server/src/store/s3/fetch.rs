//! Batch reads ([`ChunkStore::chunk_blobs`](crate::store::ChunkStore::chunk_blobs)):
//! a restore's fetch asks for [`super::READ_BATCH_BYTES`] at a time; what memory
//! and the local cache do not hold is read from the bucket with ranged
//! GETs, neighbours in one pack merged into one GET when they lie within
//! [`MERGE_GAP`] of each other, and up to [`READS_IN_FLIGHT`] GETs in
//! flight (kopia's issue 5113: one request at a time gave 5 MB/s).

use std::collections::HashMap;
use std::ops::Range;

use bkp_common::ChunkId;
use futures::StreamExt;

use super::{pack_object, Location, S3Chunks};
use crate::store::object::{merge_ranges, ObjectError};
use crate::store::{schema, StoreError};

/// GETs in flight for one batch.
pub const READS_IN_FLIGHT: usize = 16;
/// Ranges of one pack this close are read with one GET (the bytes between
/// are a blob header, or a blob another batch wants soon).
pub const MERGE_GAP: u64 = 64 << 10;

impl S3Chunks {
    pub(super) fn locations(&self, ids: &[ChunkId]) -> Result<Vec<Option<Location>>, StoreError> {
        let cf = self.db.cf(schema::CF_CHUNK_LOC);
        let found = self.db.raw().multi_get_cf(ids.iter().map(|id| (cf, id.as_bytes().to_vec())));
        ids.iter()
            .zip(found)
            .map(|(id, v)| {
                let Some(v) = v.map_err(|e| StoreError::Db(e.into_string()))? else { return Ok(None) };
                Location::decode(&v)
                    .map(Some)
                    .ok_or_else(|| StoreError::Corrupt(format!("chunk_loc of {}", id.short())))
            })
            .collect()
    }

    pub(super) fn batch_read(&self, ids: &[ChunkId], max_bytes: usize) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let locs = self.locations(ids)?;
        // The lengths are known: take the ids the batch covers.
        let (mut take, mut bytes) = (0, 0usize);
        for l in &locs {
            take += 1;
            let Some(l) = l else { break };
            bytes += l.len as usize;
            if bytes >= max_bytes {
                break;
            }
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; take];
        // Pack name -> (index in `out`, range) of what the bucket must give.
        let mut remote: HashMap<String, Vec<(usize, Range<u64>)>> = HashMap::new();
        let mut end = take;
        for (i, loc) in locs[..take].iter().enumerate() {
            let Some(loc) = loc else {
                end = i + 1;
                break;
            };
            if let Some(b) = self.local_blob(&ids[i], loc) {
                out[i] = Some(b);
                continue;
            }
            let Some(rec) = self.up.packs.read().expect("packs lock").get(&loc.pack).copied() else {
                // A pack lost in a crash before its upload: missing.
                end = i + 1;
                break;
            };
            remote.entry(pack_object(&rec.id)).or_default().push((i, loc.offset..loc.offset + loc.len as u64));
        }
        out.truncate(end);
        remote.values_mut().for_each(|v| v.retain(|(i, _)| *i < end));
        let gets: Vec<(String, Range<u64>)> = remote
            .iter()
            .flat_map(|(name, want)| {
                let ranges: Vec<Range<u64>> = want.iter().map(|(_, r)| r.clone()).collect();
                merge_ranges(&ranges, MERGE_GAP).into_iter().map(move |m| (name.clone(), m))
            })
            .collect();
        let o = self.objects.clone();
        let fetched = super::run_on(self.rt(), async move {
            futures::stream::iter(gets)
                .map(|(name, r)| {
                    let o = o.clone();
                    async move {
                        let got = o.get_range(&name, r.clone()).await;
                        (name, r, got)
                    }
                })
                .buffer_unordered(READS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await
        });
        let mut pieces: HashMap<String, Vec<(Range<u64>, bytes::Bytes)>> = HashMap::new();
        for (name, r, got) in fetched {
            match got {
                Ok(b) => pieces.entry(name).or_default().push((r, b)),
                Err(ObjectError::NotFound(_)) => {
                    tracing::error!(pack = %name, "pack missing from the bucket: its chunks treated as missing");
                }
                Err(e) => return Err(self.bucket_err(e)),
            }
        }
        for (name, want) in &remote {
            for (i, r) in want {
                let piece =
                    pieces.get(name).and_then(|ps| ps.iter().find(|(m, _)| m.start <= r.start && r.end <= m.end));
                if let Some((m, b)) = piece {
                    let blob = b.slice((r.start - m.start) as usize..(r.end - m.start) as usize);
                    if let Some(l) = &locs[*i] {
                        self.cache.put(&ids[*i], l, &blob);
                    }
                    out[*i] = Some(blob.to_vec());
                }
            }
        }
        // A missing chunk ends the answer.
        if let Some(miss) = out.iter().position(Option::is_none) {
            out.truncate(miss + 1);
        }
        Ok(out)
    }
}
