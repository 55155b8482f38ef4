//! Finding and getting data without a full restore: `bkp diff`, `bkp
//! find`, `bkp cat`. They read tree streams ([`records`], [`node`]) and
//! skip what two snapshots share by tree chunk id.

pub mod cat;
pub mod diff;
pub mod find;
pub mod node;
pub mod records;

use std::sync::Arc;

use bkp_common::tree::Meta;
use bkp_common::ChunkId;
use futures::StreamExt;

use crate::conn::Client;
use crate::error::Result;

/// Tree chunks fetched at once.
const FETCH_PARALLEL: usize = 8;

/// RFC 3339 to the second, UTC; times before 1970 show as 1970.
pub fn rfc3339(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// An entry as listings show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Shown {
    pub path: String,
    pub kind: &'static str,
    pub size: u64,
    pub mtime: String,
    pub mtime_ns: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Shown {
    pub fn of(path: &[u8], kind: node::Kind, size: u64, meta: &Meta) -> Self {
        Shown {
            // JSON escapes control characters itself; text output escapes them.
            path: String::from_utf8_lossy(path).into_owned(),
            kind: kind.name(),
            size,
            mtime: rfc3339(meta.mtime_ns),
            mtime_ns: meta.mtime_ns,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
        }
    }
}

/// How many tree chunks a command could have read, and how many it did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TreeReads {
    pub total: u64,
    pub fetched: u64,
}

/// Fetches tree chunks, several at a time; each is checked against its id.
pub async fn fetch_all(client: &Arc<Client>, ids: Vec<ChunkId>) -> Result<Vec<(ChunkId, Arc<Vec<u8>>)>> {
    futures::stream::iter(ids)
        .map(|id| {
            let c = client.clone();
            async move { c.chunk(id).await.map(|d| (id, Arc::new(d))) }
        })
        .buffer_unordered(FETCH_PARALLEL)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}
