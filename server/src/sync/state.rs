//! What a sync job remembers between runs, one `meta` record per job:
//! which remote snapshots it copied (so one removed here by this server's
//! own retention is not copied again), each set's lag behind the primary,
//! and running totals for `/metrics`.
//!
//! ```text
//! key   = "sync/" NAME
//! value = JSON {"version": 1, "server": ..., "synced": {ID_HEX: synced_ns}, "sets": {"host/name": {...}},
//!               "last_run_ns", "last_ok_ns", "bytes_total", "chunks_total", "snapshots_total"}
//! ```
//! At most [`MAX_STATE`] bytes; a record that does not decode is
//! replaced (its loss costs a re-check of every remote snapshot, and a
//! copy of those this server's retention removed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{MetaStore, StoreError};

const VERSION: u32 = 1;
/// About 400,000 copied snapshots.
pub const MAX_STATE: usize = 64 << 20;

/// One set's position behind the primary after the last listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLag {
    /// Time of the primary's newest snapshot of the set.
    pub remote_newest_ns: u64,
    /// Time of the newest snapshot of the set here (0: none).
    pub local_newest_ns: u64,
}

impl SetLag {
    pub fn lag_ns(&self) -> u64 {
        self.remote_newest_ns.saturating_sub(self.local_newest_ns)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub version: u32,
    /// The remote's address at the last run.
    pub server: String,
    /// Remote snapshot ids copied here (hex) and when.
    pub synced: BTreeMap<String, u64>,
    /// Per "host/name" of the sets the job copies.
    pub sets: BTreeMap<String, SetLag>,
    pub last_run_ns: u64,
    pub last_ok_ns: u64,
    pub bytes_total: u64,
    pub chunks_total: u64,
    pub snapshots_total: u64,
}

pub fn key(name: &str) -> Vec<u8> {
    format!("sync/{name}").into_bytes()
}

impl SyncState {
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() > MAX_STATE {
            return Err(format!("{} bytes, over the {MAX_STATE}-byte cap", b.len()));
        }
        let s: SyncState = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        if s.version != VERSION {
            return Err(format!("version {} is not {VERSION}", s.version));
        }
        Ok(s)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&SyncState { version: VERSION, ..self.clone() }).expect("sync state to json")
    }

    /// The job's record; a fresh one when there is none or it does not
    /// decode (`Err` carries why, for the log, with the fresh record).
    pub fn load(store: &dyn MetaStore, name: &str) -> Result<Result<Self, (Self, String)>, StoreError> {
        Ok(match store.meta_get(&key(name))? {
            None => Ok(Self::default()),
            Some(b) => Self::decode(&b).map_err(|e| (Self::default(), e)),
        })
    }

    pub fn save(&self, store: &dyn MetaStore, name: &str) -> Result<(), StoreError> {
        store.meta_put(&key(name), &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_golden_and_caps() {
        let mut s = SyncState { server: "a:1".into(), last_run_ns: 5, ..Default::default() };
        s.synced.insert("ab".into(), 7);
        s.sets.insert("h/n".into(), SetLag { remote_newest_ns: 9, local_newest_ns: 4 });
        let e = s.encode();
        assert_eq!(
            String::from_utf8(e.clone()).unwrap(),
            r#"{"version":1,"server":"a:1","synced":{"ab":7},"sets":{"h/n":{"remote_newest_ns":9,"local_newest_ns":4}},"last_run_ns":5,"last_ok_ns":0,"bytes_total":0,"chunks_total":0,"snapshots_total":0}"#
        );
        let back = SyncState::decode(&e).unwrap();
        assert_eq!((back.sets["h/n"].lag_ns(), back.synced["ab"]), (5, 7));
        assert!(SyncState::decode(br#"{"version":2}"#).is_err());
        assert!(SyncState::decode(&vec![b' '; MAX_STATE + 1]).unwrap_err().contains("cap"));
        assert_eq!(SetLag { remote_newest_ns: 1, local_newest_ns: 3 }.lag_ns(), 0);
    }
}
