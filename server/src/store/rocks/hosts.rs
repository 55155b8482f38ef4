//! Host numbers: each host that uploads gets a number once (in `hosts`),
//! which a chunk's meta names as its owner. Kept in memory too: a store
//! has few hosts.

use std::collections::HashMap;

use super::db::{db_err, Db};
use super::RocksStore;
use crate::store::schema::{self, HostNum};
use crate::store::StoreError;

/// The `hosts` column family, in memory.
#[derive(Default)]
pub(super) struct Hosts {
    by_name: HashMap<String, HostNum>,
    by_num: HashMap<HostNum, String>,
}

impl RocksStore {
    pub(super) fn load_hosts(&self) -> Result<(), StoreError> {
        let mut hosts = self.hosts.write().expect("hosts lock");
        for item in self.db.raw().iterator_cf(self.cf(schema::CF_HOSTS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let name = std::str::from_utf8(&k).map_err(|_| StoreError::Corrupt("hosts key is not UTF-8".into()))?;
            let n = HostNum::decode(&v).ok_or_else(|| StoreError::Corrupt(format!("hosts entry of {name}")))?;
            if hosts.by_num.insert(n, name.to_string()).is_some() {
                return Err(StoreError::Corrupt(format!("host number {} given twice", n.get())));
            }
            hosts.by_name.insert(name.to_string(), n);
        }
        Ok(())
    }

    pub(super) fn host_num(&self, host: &str) -> Option<HostNum> {
        self.hosts.read().expect("hosts lock").by_name.get(host).copied()
    }

    pub(super) fn host_name_of(&self, n: HostNum) -> Option<String> {
        self.hosts.read().expect("hosts lock").by_num.get(&n).cloned()
    }

    /// The host's number, given (durably, before any chunk names it as
    /// owner) on its first upload.
    pub(super) fn host_num_or_assign(&self, host: &str) -> Result<HostNum, StoreError> {
        if let Some(n) = self.host_num(host) {
            return Ok(n);
        }
        let mut hosts = self.hosts.write().expect("hosts lock");
        if let Some(&n) = hosts.by_name.get(host) {
            return Ok(n);
        }
        let n = match hosts.by_num.keys().max() {
            None => HostNum::FIRST,
            Some(m) => m.next().ok_or_else(|| StoreError::Db("no host numbers left".into()))?,
        };
        self.db
            .raw()
            .put_cf_opt(self.cf(schema::CF_HOSTS), host, n.encode(), &Db::synced())
            .map_err(|e| self.db.write_err(e))?;
        hosts.by_name.insert(host.to_string(), n);
        hosts.by_num.insert(n, host.to_string());
        Ok(n)
    }
}
