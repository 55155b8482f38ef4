//! Async frame reading (from any tokio stream) and writing (to a QUIC
//! stream). The only I/O in this crate, kept apart from the protocol.
//!
//! A server reads frames from peers it does not trust in two steps:
//! [`read_len`] learns a frame's length, the caller admits that many bytes
//! against a [`Budget`] (so memory held for frames in flight is bounded
//! per connection, per token and in total), then [`read_body`] allocates
//! and reads the body under a deadline, so a peer that announces a frame
//! and never completes it holds its budget only until the deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::protocol::{decode, encode, frame_len, FrameError};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("a frame of {0} bytes did not arrive within {1}s; the link is too slow or the peer stalled")]
    Deadline(usize, u64),
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<T>, IoError> {
    read_frame_capped(r, crate::protocol::MAX_FRAME).await
}

/// Like [`read_frame`] with a smaller cap, for frames read before the
/// peer is authenticated.
pub async fn read_frame_capped<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, IoError> {
    let Some(len) = read_len(r, max).await? else { return Ok(None) };
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(decode(&body)?))
}

/// Reads a frame's length prefix and checks it against `max` (and the
/// protocol's cap) before anything is allocated for the body; `Ok(None)`
/// on a clean end of stream between frames.
pub async fn read_len<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<usize>, IoError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = frame_len(prefix)?;
    if len > max {
        return Err(FrameError::TooLarge(len).into());
    }
    Ok(Some(len))
}

/// Reads and decodes a frame body of `len` bytes (its prefix already read
/// by [`read_len`]), failing if it has not all arrived within `deadline`.
pub async fn read_body<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    deadline: Duration,
) -> Result<T, IoError> {
    let mut body = vec![0u8; len];
    match tokio::time::timeout(deadline, r.read_exact(&mut body)).await {
        Ok(read) => read?,
        Err(_) => return Err(IoError::Deadline(len, deadline.as_secs())),
    };
    Ok(decode(&body)?)
}

/// Bytes that may be held at once, at one level (a connection, a token,
/// the whole server). A frame is admitted against several levels, always
/// innermost first, so waiting never forms a cycle.
pub struct Budget {
    sem: Arc<Semaphore>,
    capacity: usize,
    /// Most bytes ever held at once, for tests and metrics.
    peak: AtomicU64,
}

/// Bytes admitted against a chain of budgets; given back on drop.
pub struct Admitted {
    _permits: Vec<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { sem: Arc::new(Semaphore::new(capacity)), capacity, peak: AtomicU64::new(0) })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes admitted right now.
    pub fn held(&self) -> usize {
        self.capacity - self.sem.available_permits()
    }

    /// The most bytes that were ever admitted at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed) as usize
    }

    fn note(&self) {
        self.peak.fetch_max(self.held() as u64, Ordering::Relaxed);
    }

    /// Admits `n` bytes against every level of `chain` without waiting,
    /// or none of them.
    pub fn try_admit(chain: &[&Arc<Budget>], n: usize) -> Option<Admitted> {
        let mut permits = Vec::with_capacity(chain.len());
        for b in chain {
            // A frame larger than a level's capacity is admitted as the
            // whole level: it then waits for everything else to drain.
            let want = n.min(b.capacity) as u32;
            permits.push(b.sem.clone().try_acquire_many_owned(want).ok()?);
            b.note();
        }
        Some(Admitted { _permits: permits })
    }

    /// Admits `n` bytes against every level of `chain`, waiting for each.
    pub async fn admit(chain: &[&Arc<Budget>], n: usize) -> Admitted {
        let mut permits = Vec::with_capacity(chain.len());
        for b in chain {
            let want = n.min(b.capacity) as u32;
            permits.push(b.sem.clone().acquire_many_owned(want).await.expect("budget semaphores are never closed"));
            b.note();
        }
        Admitted { _permits: permits }
    }
}

/// Writes one frame. The stream takes the encoded frame as it is, where
/// `write_all` would copy it once more: a chunk's frame is up to 4 MiB,
/// and restores and uploads send one per chunk.
pub async fn write_frame<T: Serialize>(w: &mut quinn::SendStream, msg: &T) -> Result<(), IoError> {
    w.write_chunk(bytes::Bytes::from(encode(msg))).await.map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budget_levels_and_release() {
        let (conn, all) = (Budget::new(100), Budget::new(150));
        let a = Budget::try_admit(&[&conn, &all], 60).unwrap();
        assert!(Budget::try_admit(&[&conn, &all], 60).is_none(), "the connection's level is full");
        assert_eq!((conn.held(), all.held()), (60, 60), "a refused admission holds nothing");
        let other = Budget::new(100);
        let b = Budget::try_admit(&[&other, &all], 90).unwrap();
        assert!(Budget::try_admit(&[&other, &all], 5).is_none(), "the shared level is full");
        drop(a);
        assert_eq!((conn.held(), all.held()), (0, 90));
        drop(b);
        let c = Budget::admit(&[&conn, &all], 1000).await;
        assert_eq!((conn.held(), all.held()), (100, 150), "an oversized frame takes the whole level");
        drop(c);
        assert_eq!((conn.peak(), all.peak()), (100, 150));
    }

    #[tokio::test]
    async fn a_stalled_frame_misses_its_deadline() {
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &[0, 0, 0, 10, 1, 2]).await.unwrap();
        assert_eq!(read_len(&mut rx, 100).await.unwrap(), Some(10));
        let r = read_body::<Vec<u8>, _>(&mut rx, 10, Duration::from_millis(50)).await;
        assert!(matches!(r, Err(IoError::Deadline(10, _))), "{r:?}");
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &[0, 0, 1, 0]).await.unwrap();
        assert!(matches!(read_len(&mut rx, 100).await, Err(IoError::Frame(FrameError::TooLarge(256)))));
    }
}
