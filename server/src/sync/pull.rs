//! The primary's side of a sync: one QUIC connection with the job's
//! sync token (the client library's connection: pinned certificate,
//! hello, retries), listings, snapshot records, and chunk fetches with
//! several requests in flight, paced by the job's `rate_limit`.
//!
//! Blobs are handed over as they arrive, not yet checked: the local side
//! re-hashes every one before it stores it (`super::local::Copy::put`).

use std::sync::Arc;

use bkp_client::config::{ClientConfig, Trust};
use bkp_client::{Client, ClientError};
use bkp_common::protocol::{Role, MAX_FETCH};
use bkp_common::rate::RateLimit;
use bkp_common::snapshot::{Snapshot, SnapshotSummary};
use bkp_common::{ChunkId, SnapshotId};
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::error::SyncError;

/// GetChunks requests in flight at once.
const FETCHES_IN_FLIGHT: usize = 4;
/// Blobs received and not yet stored, at most (about 4 MiB each at worst).
const RECEIVED_QUEUE: usize = 64;

/// A connection to the primary, used from the job's blocking thread.
pub struct Remote {
    client: Arc<Client>,
    rt: Handle,
    limit: Option<Arc<RateLimit>>,
    /// What the job calls the remote, for messages.
    pub label: String,
}

impl Remote {
    /// Connects with the sync token and refuses any other role: a push
    /// token would quietly sync its own host only, and a secondary must
    /// not hold an admin token of its primary.
    pub fn connect(
        rt: Handle,
        label: String,
        server: &str,
        fingerprint: &str,
        token: String,
        rate_limit: u64,
    ) -> Result<Self, SyncError> {
        let cfg = ClientConfig {
            server: server.to_string(),
            trust: Trust::Fingerprint(fingerprint.to_string()),
            token,
            timeout: bkp_client::conn::DEFAULT_TIMEOUT,
        };
        let limit = RateLimit::new(rate_limit).map(Arc::new);
        // Limited: half a second at the limit (at least 256 KiB) in flight.
        let connect = match &limit {
            None => rt.block_on(Client::connect(&cfg)),
            Some(l) => {
                rt.block_on(Client::connect_paced(&cfg, (l.bytes_per_sec() / 2).clamp(256 << 10, 64 << 20) as u32))
            }
        };
        let client = connect.map_err(|e| SyncError::Remote(label.clone(), e))?;
        if client.role != Role::Sync {
            let role = client.role.as_str();
            rt.block_on(client.close());
            return Err(SyncError::Role(label, role));
        }
        Ok(Self { client: Arc::new(client), rt, limit, label })
    }

    fn remote_err(&self, e: ClientError) -> SyncError {
        SyncError::Remote(self.label.clone(), e)
    }

    /// Every snapshot the remote holds, oldest first.
    pub fn list(&self) -> Result<Vec<SnapshotSummary>, SyncError> {
        let mut l = self.rt.block_on(self.client.snapshots(None, None)).map_err(|e| self.remote_err(e))?;
        l.sort_by_key(|s| s.time_ns);
        Ok(l)
    }

    pub fn snapshot(&self, id: SnapshotId) -> Result<Snapshot, ClientError> {
        self.rt.block_on(self.client.snapshot(id))
    }

    /// Fetches `ids`, handing each `(id, blob)` to `each` in the order
    /// they arrive; stops at the first error (the remote's refusal, a lost
    /// link, or `each`'s own).
    pub fn fetch<E: From<ClientError>>(
        &self,
        ids: Vec<ChunkId>,
        mut each: impl FnMut(ChunkId, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        if ids.is_empty() {
            return Ok(());
        }
        let (tx, mut rx) = mpsc::channel::<Result<(ChunkId, Vec<u8>), ClientError>>(RECEIVED_QUEUE);
        let (client, limit) = (self.client.clone(), self.limit.clone());
        let task = self.rt.spawn(async move {
            let groups: Vec<Vec<ChunkId>> = ids.chunks(MAX_FETCH).map(<[ChunkId]>::to_vec).collect();
            futures::stream::iter(groups)
                .for_each_concurrent(FETCHES_IN_FLIGHT, |group| {
                    let (client, limit, tx) = (client.clone(), limit.clone(), tx.clone());
                    async move {
                        if let Err(e) = fetch_group(&client, group, limit.as_deref(), &tx).await {
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                })
                .await;
        });
        let mut result = Ok(());
        while let Some(item) = rx.blocking_recv() {
            let r = item.map_err(E::from).and_then(|(id, blob)| each(id, blob));
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        // Dropping the receiver ends the fetches still going.
        drop(rx);
        let _ = self.rt.block_on(task);
        result
    }

    pub fn close(self) {
        if let Ok(client) = Arc::try_unwrap(self.client) {
            self.rt.block_on(client.close());
        }
    }
}

/// One GetChunks request; each blob waits its turn on the rate limit.
async fn fetch_group(
    client: &Client,
    group: Vec<ChunkId>,
    limit: Option<&RateLimit>,
    tx: &mpsc::Sender<Result<(ChunkId, Vec<u8>), ClientError>>,
) -> Result<(), ClientError> {
    let mut f = client.fetch(group).await?;
    while let Some((id, blob)) = f.next_blob().await? {
        if let Some(l) = limit {
            l.take(blob.len()).await;
        }
        if tx.send(Ok((id, blob))).await.is_err() {
            // The job stopped taking blobs.
            return Ok(());
        }
    }
    Ok(())
}
