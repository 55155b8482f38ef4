//! Progress reporting. The library calls a [`Progress`]; only the CLI
//! draws bars.

pub trait Progress: Send + Sync {
    /// Input bytes read and chunked.
    fn read(&self, _bytes: u64) {}
    /// A file of this size was taken unchanged from the metadata cache.
    fn cached(&self, _bytes: u64) {}
    /// A file (or the stream) was fully read.
    fn file_done(&self) {}
    /// Bytes sent to the server that it did not already have (compressed).
    fn uploaded(&self, _bytes: u64) {}
    /// Bytes written by a restore.
    fn restored(&self, _bytes: u64) {}
    /// Whether to pre-scan a tree push for [`Progress::totals`] (a second
    /// walk, ahead of the push: worth it only when someone watches).
    fn wants_totals(&self) -> bool {
        false
    }
    /// The pre-scan's count so far: regular files and their bytes; `done`
    /// once it has seen everything (the totals are final).
    fn totals(&self, _files: u64, _bytes: u64, _done: bool) {}
    /// The bytes a restore is going to write, known before it starts.
    fn restore_total(&self, _bytes: u64) {}
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}
