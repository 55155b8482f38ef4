//! The control socket, `DATA/control.sock` (mode 0600): how
//! `bkp-server prune|gc|verify|jobs|status|reload` reach a running server, since RocksDB
//! admits one process. One JSON request line, one JSON answer line.
//! Access is the file's permission: whoever may read the data directory.
//!
//! `serve` takes an exclusive `flock` on `DATA/serve.lock` before anything
//! else and holds it until it exits (the kernel drops it if the process
//! dies), so a job command can tell a server that is still starting (lock
//! held, no socket yet) from none at all, and wait for the socket instead
//! of failing on the database lock.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::gc::GcHooks;
use crate::jobs::{self, JobKind, JobRecord, Jobs};
use crate::state::ServerState;
use crate::verify::Scope;

pub const SOCKET: &str = "control.sock";
pub const SERVE_LOCK: &str = "serve.lock";
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// `user`: who the CLI runs as ($SUDO_USER, else $USER), for the audit
    /// log beside the socket peer's uid and pid.
    Run {
        kind: JobKind,
        dry_run: bool,
        #[serde(default)]
        user: Option<String>,
    },
    Verify {
        scope: Scope,
        #[serde(default)]
        user: Option<String>,
    },
    Jobs {
        limit: usize,
    },
    Status,
    /// Runs the `[[sync]]` job named `remote`.
    Sync {
        remote: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Read the config file again (as SIGHUP does) and say what changed.
    Reload {
        #[serde(default)]
        user: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    Job(JobRecord),
    Jobs(Vec<JobRecord>),
    Error(String),
    Status(Box<crate::status::ServerStatus>),
    Reloaded(crate::config::Reloaded),
}

pub fn socket_path(data: &Path) -> PathBuf {
    data.join(SOCKET)
}

pub fn bind(data: &Path) -> std::io::Result<UnixListener> {
    let p = socket_path(data);
    // A socket left by a killed server: nothing answers on it.
    if p.exists() && std::os::unix::net::UnixStream::connect(&p).is_err() {
        std::fs::remove_file(&p)?;
    }
    let l = UnixListener::bind(&p)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, state: Arc<ServerState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, state).await {
                warn!("control connection: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, state: Arc<ServerState>) -> std::io::Result<()> {
    // The kernel's word on the peer; a job's audit line names it.
    let peer = match stream.peer_cred() {
        Ok(c) => format!("socket uid={} pid={}", c.uid(), c.pid().map_or("?".into(), |p| p.to_string())),
        Err(e) => format!("socket (peer unknown: {e})"),
    };
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<ControlRequest>(&line) {
        Err(e) => ControlResponse::Error(format!("bad control request: {e}")),
        Ok(req) => {
            let st = state.clone();
            tokio::task::spawn_blocking(move || answer(&st, req, &peer))
                .await
                .unwrap_or_else(|e| ControlResponse::Error(e.to_string()))
        }
    };
    let mut out = serde_json::to_vec(&resp).expect("response to json");
    out.push(b'\n');
    w.write_all(&out).await
}

/// Answers a request against an open state (server or local); `by` says
/// where it came from ("socket uid=0 pid=42", "cli uid=0").
pub fn answer(state: &ServerState, req: ControlRequest, by: &str) -> ControlResponse {
    let who = |user: Option<String>| match user {
        Some(u) => format!("{by} user={u}"),
        None => by.to_string(),
    };
    match req {
        ControlRequest::Run { kind, dry_run, user } => {
            let (by, cfg) = (who(user), state.config());
            let jobs = Jobs { by: &by, ..state.jobs(&cfg) };
            ControlResponse::Job(jobs::run(&jobs, kind, dry_run, &GcHooks::from_env()))
        }
        ControlRequest::Verify { scope, user } => {
            let (by, cfg) = (who(user), state.config());
            ControlResponse::Job(jobs::run_verify(&Jobs { by: &by, ..state.jobs(&cfg) }, scope))
        }
        ControlRequest::Jobs { limit } => match jobs::list(state.store().as_ref(), state.running(), limit) {
            Ok(l) => ControlResponse::Jobs(l),
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::Sync { remote, user } => {
            let (by, cfg) = (who(user), state.config());
            let jobs = Jobs { by: &by, ..state.jobs(&cfg) };
            // The server's runtime when there is one (this runs on its
            // blocking pool); the CLI without a server makes its own.
            let record = match tokio::runtime::Handle::try_current() {
                Ok(h) => jobs::run_sync(&jobs, &remote, h),
                Err(_) => match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => jobs::run_sync(&jobs, &remote, rt.handle().clone()),
                    Err(e) => return ControlResponse::Error(format!("starting a runtime for the sync: {e}")),
                },
            };
            state.monitor().nudge.notify_one();
            ControlResponse::Job(record)
        }
        ControlRequest::Status => match crate::status::collect(&state.monitor_inputs(&state.config())) {
            Ok(s) => ControlResponse::Status(Box::new(s)),
            Err(e) => ControlResponse::Error(format!("reading the store for the status: {e}")),
        },
        ControlRequest::Reload { user } => match state.reload(&who(user)) {
            Ok(r) => ControlResponse::Reloaded(r),
            Err(e) => ControlResponse::Error(format!("reload refused, the running config stays in force: {e}")),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the server stopped during the job; check its log (a run cut short is not recorded)")]
    ServerStopped,
    #[error("talking to the running server: {0}")]
    Io(String),
    #[error("the running server's answer does not decode ({0}); is it the same version as this command?")]
    Decode(String),
}

impl ControlError {
    /// Whether asking again can help: a server that stopped may be
    /// restarted (then run the command again); an answer that does not
    /// decode needs matching versions first.
    pub fn retryable(&self) -> bool {
        !matches!(self, ControlError::Decode(_))
    }
}

/// Sends a request to a running server; `None` when none is listening.
pub fn call(data: &Path, req: &ControlRequest) -> Option<Result<ControlResponse, ControlError>> {
    use std::io::{BufRead, ErrorKind, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket_path(data)).ok()?;
    let mut line = serde_json::to_vec(req).expect("request to json");
    line.push(b'\n');
    let r = s.write_all(&line).and_then(|_| {
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).map(|_| answer)
    });
    Some(match r {
        // The server closed the socket without an answer: it died.
        Ok(a) if a.is_empty() => Err(ControlError::ServerStopped),
        Ok(a) => serde_json::from_str(&a).map_err(|e| ControlError::Decode(e.to_string())),
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
            Err(ControlError::ServerStopped)
        }
        Err(e) => Err(ControlError::Io(e.to_string())),
    })
}

/// Why `serve` could not take `DATA/serve.lock`.
#[derive(Debug, thiserror::Error)]
pub enum ServeLockError {
    #[error("{0} is not an initialised data directory; run `bkp-server init --data {0}`")]
    NotInitialised(String),
    /// Another `serve` runs there: stop it first (waiting does not help
    /// unless it is stopping).
    #[error("another `bkp-server serve` (pid {pid}) is using {data}; stop it first")]
    Held { pid: String, data: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Taken by `serve` first thing, held for its lifetime.
pub fn lock_serve(data: &Path) -> Result<std::fs::File, ServeLockError> {
    use std::io::{Read, Seek, Write};
    let p = data.join(SERVE_LOCK);
    let mut f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&p).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::NotFound => ServeLockError::NotInitialised(data.display().to_string()),
            _ => ServeLockError::Io(p.display().to_string(), e),
        },
    )?;
    // std's file locks are flock(2) on Linux: the same lock older
    // binaries and `serve_running` take.
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(ServeLockError::Held { pid: pid.trim().to_string(), data: data.display().to_string() });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(ServeLockError::Io(format!("locking {}", p.display()), e)),
    }
    // The pid is for the message above only; the lock is the truth.
    let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| write!(f, "{}", std::process::id()));
    Ok(f)
}

/// Is a `serve` holding `DATA/serve.lock` (running, or still starting)?
pub fn serve_running(data: &Path) -> bool {
    let Ok(f) = std::fs::File::open(data.join(SERVE_LOCK)) else { return false };
    // Closing `f` drops the probe's shared lock.
    matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

/// A pause between opening the store and binding the control socket, for
/// tests of job commands against a starting server.
pub fn start_delay_for_tests() {
    if let Some(ms) = std::env::var("BKP_TEST_SERVE_START_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_dies_mid_request_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        // Reads the request, then closes without answering, as a killed
        // server's socket does.
        let t = std::thread::spawn(move || {
            use std::io::BufRead;
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        });
        let r = call(dir.path(), &ControlRequest::Jobs { limit: 1 }).unwrap();
        t.join().unwrap();
        let e = r.unwrap_err();
        assert!(matches!(e, ControlError::ServerStopped), "{e}");
        assert!(e.retryable() && !ControlError::Decode("x".into()).retryable());
        assert!(e.to_string().starts_with("the server stopped during the job; check its log"));
    }

    #[test]
    fn serve_lock_is_exclusive_and_seen() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!serve_running(dir.path()));
        let held = lock_serve(dir.path()).unwrap();
        assert!(serve_running(dir.path()));
        let e = lock_serve(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        assert!(!serve_running(dir.path()));
        let e = lock_serve(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, ServeLockError::NotInitialised(_)), "{e}");
        assert!(e.to_string().contains("not an initialised data directory"), "{e}");
    }
}
