//! The control socket, `DATA/control.sock` (mode 0600): how
//! `bkp-server prune|gc|verify|jobs` reach a running server, since RocksDB
//! admits one process. One JSON request line, one JSON answer line.
//! Access is the file's permission: whoever may read the data directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::gc::GcHooks;
use crate::jobs::{self, JobKind, JobRecord};
use crate::server::ServerState;
use crate::verify::Scope;

pub const SOCKET: &str = "control.sock";
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    Run { kind: JobKind, dry_run: bool },
    Verify { scope: Scope },
    Jobs { limit: usize },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    Job(JobRecord),
    Jobs(Vec<JobRecord>),
    Error(String),
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
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<ControlRequest>(&line) {
        Err(e) => ControlResponse::Error(format!("bad control request: {e}")),
        Ok(req) => {
            let st = state.clone();
            tokio::task::spawn_blocking(move || answer(&st, req))
                .await
                .unwrap_or_else(|e| ControlResponse::Error(e.to_string()))
        }
    };
    let mut out = serde_json::to_vec(&resp).expect("response to json");
    out.push(b'\n');
    w.write_all(&out).await
}

/// Answers a request against an open state (server or local).
pub fn answer(state: &ServerState, req: ControlRequest) -> ControlResponse {
    match req {
        ControlRequest::Run { kind, dry_run } => {
            ControlResponse::Job(jobs::run(state, kind, dry_run, &GcHooks::from_env()))
        }
        ControlRequest::Verify { scope } => ControlResponse::Job(jobs::run_verify(state, scope)),
        ControlRequest::Jobs { limit } => match jobs::list(state, limit) {
            Ok(l) => ControlResponse::Jobs(l),
            Err(e) => ControlResponse::Error(e),
        },
    }
}

/// Sends a request to a running server; `None` when none is listening.
pub fn call(data: &Path, req: &ControlRequest) -> Option<Result<ControlResponse, String>> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket_path(data)).ok()?;
    let mut line = serde_json::to_vec(req).expect("request to json");
    line.push(b'\n');
    let r = s.write_all(&line).and_then(|_| {
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).map(|_| answer)
    });
    Some(r.map_err(|e| e.to_string()).and_then(|a| serde_json::from_str(&a).map_err(|e| e.to_string())))
}
