//! Async frame reading (from any tokio stream) and writing (to a QUIC
//! stream). The only I/O in this crate, kept apart from the protocol.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::{decode, encode, frame_len, FrameError};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
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
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(decode(&body)?))
}

/// Writes one frame. The stream takes the encoded frame as it is, where
/// `write_all` would copy it once more: a chunk's frame is up to 4 MiB,
/// and restores and uploads send one per chunk.
pub async fn write_frame<T: Serialize>(w: &mut quinn::SendStream, msg: &T) -> Result<(), IoError> {
    w.write_chunk(bytes::Bytes::from(encode(msg))).await.map_err(std::io::Error::from)?;
    Ok(())
}
