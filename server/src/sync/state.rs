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

use crate::store::{schema, MetaStore, StoreError};

pub use crate::store::schema::MAX_SYNC_STATE as MAX_STATE;
pub use crate::store::schema::{SetLag, SyncState};

impl SyncState {
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        schema::decode_sync_state(b).map_err(|e| e.to_string())
    }

    pub fn encode(&self) -> Vec<u8> {
        schema::encode_sync_state(self)
    }

    /// The job's record; a fresh one when there is none or it does not
    /// decode (`Err` carries why, for the log, with the fresh record).
    pub fn load(store: &dyn MetaStore, name: &str) -> Result<Result<Self, (Self, String)>, StoreError> {
        Ok(match store.sync_state(name) {
            Ok(None) => Ok(Self::default()),
            Ok(Some(s)) => Ok(s),
            Err(StoreError::Corrupt(e)) => Err((Self::default(), e)),
            Err(e) => return Err(e),
        })
    }

    pub fn save(&self, store: &dyn MetaStore, name: &str) -> Result<(), StoreError> {
        store.set_sync_state(name, self)
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
