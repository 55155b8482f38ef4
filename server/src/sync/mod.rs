//! A second site: `[[sync]]` jobs pull another bkp server's snapshots
//! into this one over the ordinary QUIC protocol, with a token of the
//! `sync` role there (reads every host, may change nothing).
//!
//! The copy is this server's own: a snapshot is committed under its
//! original host, set, time and id, with the checks a push gets
//! ([`local`]); retention, GC, verify and restores here treat it like any
//! other. Nothing the primary does deletes it, unless the job sets
//! `remove_vanished`. See [`job`] for what is copied and skipped, and
//! [`state`] for what a job remembers between runs.
//!
//! | step | where |
//! |------|-------|
//! | the job's configuration | [`config`] |
//! | connection, listing, fetches, the rate limit | [`pull`] |
//! | session, possession, hash checks, commit | [`local`] |
//! | one run | [`job`] |
//!
//! A sync and a GC here overlap as a push and a GC do: the copy is a push
//! session of the snapshot's host, under the same fence.

pub mod config;
mod error;
pub mod job;
pub mod local;
pub mod pull;
pub mod state;

pub use config::SyncJob;
pub use error::SyncError;
pub use job::{Ctx, SyncReport};

/// Runs the job named `name` of `jobs` once: connects, copies, closes.
/// Blocks; network I/O runs on `rt` (a runtime of the caller's). The
/// report is there whenever the run got as far as connecting.
pub fn run_named(
    ctx: &Ctx<'_>,
    jobs: &[SyncJob],
    name: &str,
    rt: tokio::runtime::Handle,
) -> (Option<SyncReport>, Result<(), SyncError>) {
    match connect(jobs, name, rt) {
        Err(e) => (None, Err(e)),
        Ok((job, remote)) => {
            let (report, r) = job::run(ctx, job, &remote);
            remote.close();
            (Some(report), r)
        }
    }
}

fn connect<'j>(
    jobs: &'j [SyncJob],
    name: &str,
    rt: tokio::runtime::Handle,
) -> Result<(&'j SyncJob, pull::Remote), SyncError> {
    let Some(job) = jobs.iter().find(|j| j.name == name) else {
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        let names = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        return Err(SyncError::Unknown(name.to_string(), names));
    };
    let fingerprint = job.fingerprint_hex().map_err(SyncError::Config)?;
    let token = job.token().map_err(SyncError::Config)?;
    let remote = pull::Remote::connect(rt, job.name.clone(), &job.server, &fingerprint, token, job.rate_limit)?;
    Ok((job, remote))
}
