//! Backup definitions (`[[backup]]` in client.toml) and `bkp run`: each
//! definition is a push of file trees or of a dump command's output,
//! between an optional `before` hook (failing: nothing is pushed) and an
//! `after` hook that is told the result in its environment.
//!
//! Exit codes, for `bkp push` and `bkp run` alike (restic's): 0 complete,
//! 1 failed (nothing committed), 3 committed without some files that could
//! not be read. `bkp run --all` goes on after a failure and exits with the
//! worst code of its definitions (1 over 3 over 0).

pub mod definition;
pub mod report;

pub use crate::backup_def::BackupDef;
pub use definition::{hook, select};
pub use report::{Exit, Outcome};
