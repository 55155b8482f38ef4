//! Formats, chunking, hashing and the wire protocol shared by the bkp
//! client and server. One module per format; none of them does I/O
//! except [`io`], which only moves frames.

pub mod blob;
pub mod chunker;
pub mod ids;
#[cfg(feature = "io")]
pub mod io;
pub mod names;
pub mod protocol;
#[cfg(feature = "io")]
pub mod quic;
#[cfg(feature = "io")]
pub mod rate;
pub mod seal;
pub mod snapshot;
pub mod tree;
pub mod zstd_ctx;

pub use ids::{ChunkId, ContentHash, SnapshotId};

/// The version string both binaries report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
