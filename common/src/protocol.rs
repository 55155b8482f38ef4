//! The wire protocol, without I/O: messages and their framing over byte
//! buffers.
//!
//! A connection is QUIC with TLS 1.3 and ALPN [`ALPN`]. The client's first
//! bidirectional stream carries [`Request::Hello`] (magic, version, token);
//! the server answers [`Response::Welcome`] or an error and closes. After
//! that every operation is one bidirectional stream: one request, then its
//! responses. Uploads put many [`Request::PutChunk`] frames on one stream
//! and the server answers once when the stream finishes.
//!
//! ```text
//! frame = len:u32 BE (<= MAX_FRAME) postcard(message)
//! ```

use serde::{Deserialize, Serialize};

use crate::blob::MAX_BLOB;
use crate::ids::{ChunkId, SnapshotId};
use crate::snapshot::{Incomplete, Snapshot, SnapshotKind, SnapshotSummary, SummaryV1};

pub const ALPN: &[u8] = b"bkp/1";
pub const MAGIC: [u8; 4] = *b"BKP\0";
pub const VERSION: u16 = 1;
/// One chunk blob plus its envelope; every other message is smaller.
pub const MAX_FRAME: usize = MAX_BLOB + 1024;
/// Ids per has-chunk query (a fetch is capped by [`MAX_FETCH`]).
pub const MAX_IDS: usize = 8192;
/// Chunks per `GetChunks` request; the server answers with one `Chunk`
/// frame per id on the request's stream, and refuses more.
pub const MAX_FETCH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Push,
    Restore,
    Admin,
    /// A second site's pull: lists and reads every host's snapshots and
    /// chunks, and nothing else (no push, forget or protect). Appended
    /// last, so the older roles keep their bytes.
    Sync,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Push => "push",
            Role::Restore => "restore",
            Role::Admin => "admin",
            Role::Sync => "sync",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "push" => Ok(Role::Push),
            "restore" => Ok(Role::Restore),
            "admin" => Ok(Role::Admin),
            "sync" => Ok(Role::Sync),
            _ => Err(format!("unknown role {s:?}: use push, restore, admin or sync")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello {
        magic: [u8; 4],
        version: u16,
        token: String,
        client: String,
    },
    StartPush {
        name: String,
        kind: SnapshotKind,
    },
    /// Which of these does the server hold for this host? Answered with
    /// [`Response::Missing`].
    HasChunks {
        session: u64,
        ids: Vec<ChunkId>,
    },
    PutChunk {
        session: u64,
        id: ChunkId,
        #[serde(with = "serde_bytes")]
        blob: Vec<u8>,
    },
    Commit {
        session: u64,
        tree: Vec<ChunkId>,
    },
    ListSnapshots {
        /// Admin only; other roles always see their own host.
        host: Option<String>,
        name: Option<String>,
    },
    GetSnapshot {
        id: SnapshotId,
    },
    /// Answered with one [`Response::Chunk`] per id, in order.
    GetChunks {
        ids: Vec<ChunkId>,
    },
    /// Admin only: delete one snapshot (its chunks go at the next GC).
    Forget {
        id: SnapshotId,
    },
    /// Admin only: protect a snapshot from prune, or lift that.
    Protect {
        id: SnapshotId,
        protected: bool,
    },
    /// A push of set `name` failed on the client (its dump command failed,
    /// a read failed, the connection was lost): the server records it and
    /// alerts. Answered with [`Response::Done`].
    PushFailed {
        name: String,
        /// `None` when the client failed before it knew.
        kind: Option<SnapshotKind>,
        /// What the client reported, at most [`MAX_REASON`] bytes.
        reason: String,
    },
    /// `Commit` of a tree some files of which could not be read: the
    /// snapshot is stored marked incomplete. Answered like `Commit`.
    CommitIncomplete {
        session: u64,
        tree: Vec<ChunkId>,
        incomplete: Incomplete,
    },
    /// `ListSnapshots`, answered with [`Response::SnapshotsFull`]: the
    /// summaries with the fields added after version 1.
    ListSnapshotsFull {
        host: Option<String>,
        name: Option<String>,
    },
}

/// Longest failure reason a client sends in [`Request::PushFailed`].
pub const MAX_REASON: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Rejected,
    Internal,
    Busy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Welcome {
        host: String,
        role: Role,
        server: String,
    },
    PushStarted {
        session: u64,
    },
    /// Indices (into the query) of the chunks the client must upload.
    Missing(Vec<u32>),
    /// Chunks and blob bytes accepted on this upload stream. Whether the
    /// store already held them from another host is never said.
    PutOk {
        chunks: u32,
        bytes: u64,
    },
    Committed(SummaryV1),
    Snapshots(Vec<SummaryV1>),
    Snapshot {
        id: SnapshotId,
        snapshot: Snapshot,
    },
    Chunk {
        id: ChunkId,
        #[serde(with = "serde_bytes")]
        blob: Vec<u8>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Done,
    /// The answer to [`Request::ListSnapshotsFull`].
    SnapshotsFull(Vec<SnapshotSummary>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte cap")]
    TooLarge(usize),
    #[error("frame does not decode: {0}")]
    Decode(String),
}

/// Encodes a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Sized first: grown as it was written, a chunk's frame was copied
    // again at every doubling of the Vec.
    let len = postcard::experimental::serialized_size(msg).expect("postcard size");
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    postcard::to_extend(msg, out).expect("postcard to Vec")
}

/// Checks a frame's length prefix before the body is read or allocated.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    postcard::from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Splits complete frames off the front of a buffer. Used by the fuzzer
/// and by tests; the async readers use [`frame_len`] and [`decode`].
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = frame_len(buf[..4].try_into().expect("4 bytes"))?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let msgs = vec![
            Request::Hello { magic: MAGIC, version: VERSION, token: "t".into(), client: "c".into() },
            Request::HasChunks { session: 9, ids: vec![ChunkId::of(b"a")] },
            Request::PutChunk { session: 1, id: ChunkId::of(b"a"), blob: vec![1, 2, 3] },
            Request::ListSnapshots { host: None, name: Some("db".into()) },
            Request::PushFailed { name: "db".into(), kind: None, reason: "pg_dump exited 1".into() },
        ];
        for m in msgs {
            let f = encode(&m);
            let (body, used) = split_frame(&f).unwrap().unwrap();
            assert_eq!(used, f.len());
            assert_eq!(decode::<Request>(body).unwrap(), m);
        }
    }

    #[test]
    fn golden_bytes() {
        let f = encode(&Request::Hello { magic: MAGIC, version: 1, token: "t".into(), client: "c".into() });
        assert_eq!(f, [0, 0, 0, 10, 0, b'B', b'K', b'P', 0, 1, 1, b't', 1, b'c']);
        let f = encode(&Response::Missing(vec![0, 300]));
        assert_eq!(f, [0, 0, 0, 5, 2, 2, 0, 0xac, 0x02]);
        // Appended last: variant 10, so every older request keeps its bytes.
        let f =
            encode(&Request::PushFailed { name: "db".into(), kind: Some(SnapshotKind::Stream), reason: "x".into() });
        assert_eq!(f, [0, 0, 0, 8, 10, 2, b'd', b'b', 1, 1, 1, b'x']);
        let f = encode(&Request::Protect { id: SnapshotId::from_bytes([0; 32]), protected: true });
        assert_eq!(f[4], 9);
        // Appended after PushFailed: 11 and 12.
        let inc = Incomplete { skipped: 3, paths: vec!["/a".into()] };
        let f = encode(&Request::CommitIncomplete { session: 2, tree: vec![], incomplete: inc.clone() });
        assert_eq!(f, [0, 0, 0, 8, 11, 2, 0, 3, 1, 2, b'/', b'a']);
        let f = encode(&Request::ListSnapshotsFull { host: None, name: Some("d".into()) });
        assert_eq!(f, [0, 0, 0, 5, 12, 0, 1, 1, b'd']);
        // A full summary is the version 1 summary and the incomplete record after it.
        let v1 = SummaryV1 {
            id: SnapshotId::from_bytes([0; 32]),
            host: "h".into(),
            name: "n".into(),
            time_ns: 1,
            kind: SnapshotKind::Tree,
            stats: Default::default(),
            protected: false,
        };
        let full = SnapshotSummary { incomplete: Some(inc), ..SnapshotSummary::from(v1.clone()) };
        let old = encode(&Response::Snapshots(vec![v1]));
        let new = encode(&Response::SnapshotsFull(vec![full]));
        assert_eq!(old[4], 5);
        assert_eq!(new[4], 10, "appended after Done");
        assert_eq!(&new[5..], [&old[5..], &[1, 3, 1, 2, b'/', b'a'][..]].concat());
        // Roles by index: sync was appended, the others keep theirs.
        let welcome = |role| encode(&Response::Welcome { host: "h".into(), role, server: "v".into() });
        assert_eq!(welcome(Role::Push), [0, 0, 0, 6, 0, 1, b'h', 0, 1, b'v']);
        assert_eq!(welcome(Role::Admin)[7], 2);
        assert_eq!(welcome(Role::Sync), [0, 0, 0, 6, 0, 1, b'h', 3, 1, b'v']);
    }

    #[test]
    fn roles_parse_and_print() {
        for r in [Role::Push, Role::Restore, Role::Admin, Role::Sync] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().unwrap_err().contains("sync"));
    }

    #[test]
    fn rejects_oversize_and_garbage() {
        assert!(matches!(frame_len(u32::MAX.to_be_bytes()), Err(FrameError::TooLarge(_))));
        assert!(split_frame(&[0, 0, 0]).unwrap().is_none());
        assert!(decode::<Request>(&[200, 1, 2]).is_err());
        // A has-chunks query claiming 2^31 ids in a 10-byte body fails
        // without allocating for them.
        assert!(decode::<Request>(&[2, 1, 0xff, 0xff, 0xff, 0xff, 0x07]).is_err());
    }
}
