//! Host numbers: each host that uploads gets a number once (in `hosts`),
//! which a chunk's meta names as its owner. Kept in memory too: a store
//! has few hosts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::db::{db_err, Db};
use crate::store::error::StoreError;
use crate::store::schema::{self, HostNum};

/// The `hosts` column family, in memory, and the database that keeps it.
pub(super) struct Hosts {
    db: Arc<Db>,
    maps: RwLock<Maps>,
}

#[derive(Default)]
struct Maps {
    by_name: HashMap<String, HostNum>,
    by_num: HashMap<HostNum, String>,
}

impl Hosts {
    pub(super) fn load(db: Arc<Db>) -> Result<Self, StoreError> {
        let mut maps = Maps::default();
        for item in db.raw().iterator_cf(db.cf(schema::CF_HOSTS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let name = std::str::from_utf8(&k).map_err(|_| StoreError::Corrupt("hosts key is not UTF-8".into()))?;
            let n = HostNum::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("hosts entry of {name}")))?;
            if maps.by_num.insert(n, name.to_string()).is_some() {
                return Err(StoreError::Corrupt(format!("host number {} given twice", n.get())));
            }
            maps.by_name.insert(name.to_string(), n);
        }
        Ok(Self { db, maps: RwLock::new(maps) })
    }

    pub(super) fn num(&self, host: &str) -> Option<HostNum> {
        self.maps.read().expect("hosts lock").by_name.get(host).copied()
    }

    pub(super) fn name(&self, n: HostNum) -> Option<String> {
        self.maps.read().expect("hosts lock").by_num.get(&n).cloned()
    }

    /// The host's number, given (durably, before any chunk names it as
    /// owner) on its first upload.
    pub(super) fn num_or_assign(&self, host: &str) -> Result<HostNum, StoreError> {
        if let Some(n) = self.num(host) {
            return Ok(n);
        }
        let mut maps = self.maps.write().expect("hosts lock");
        if let Some(&n) = maps.by_name.get(host) {
            return Ok(n);
        }
        let n = match maps.by_num.keys().max() {
            None => HostNum::FIRST,
            Some(m) => m.next().ok_or_else(|| StoreError::Db("no host numbers left".into()))?,
        };
        self.db
            .raw()
            .put_cf_opt(self.db.cf(schema::CF_HOSTS), host, n.encode(), &Db::synced())
            .map_err(|e| self.db.write_err(e))?;
        maps.by_name.insert(host.to_string(), n);
        maps.by_num.insert(n, host.to_string());
        Ok(n)
    }
}
