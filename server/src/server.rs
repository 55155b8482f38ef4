//! The server as a library: bind an endpoint for an open [`ServerState`],
//! run until `shutdown` resolves. Tests call [`run`] on 127.0.0.1:0.
//! Besides the QUIC endpoint, [`serve`] runs the tasks around it: the
//! control socket, the scheduler, the monitor's checks, the HTTP endpoint
//! and the token watcher that applies revocations.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, warn};

pub use crate::state::{ServerError, ServerState, DB_DIR};
use crate::tls;

/// Connection receive window until the hello is authenticated: room for
/// a hello (at most 4 KiB) and the length prefix of an oversized one.
pub const HELLO_WINDOW: u32 = 16 << 10;

/// The transport a connection starts with: the shared one, with one
/// stream and a small window, so that a peer that has not authenticated
/// can make the server buffer only [`HELLO_WINDOW`] bytes. The hello
/// raises both to the shared values (`connection.rs`), so an established
/// connection runs exactly on `bkp_common::quic::transport()`.
fn unauthenticated_transport() -> quinn::TransportConfig {
    let mut t = bkp_common::quic::transport();
    t.max_concurrent_bidi_streams(1u32.into());
    t.receive_window(HELLO_WINDOW.into());
    t
}

/// Binds the QUIC endpoint with the data directory's certificate.
pub fn bind(data_dir: &Path, listen: SocketAddr) -> Result<quinn::Endpoint, ServerError> {
    let mut cfg = tls::server_config(data_dir)?;
    cfg.transport_config(Arc::new(unauthenticated_transport()));
    // 0-RTT data buffered for a connection not yet accepted: none is used.
    cfg.incoming_buffer_size(HELLO_WINDOW.into());
    cfg.incoming_buffer_size_total(4 << 20);
    let socket = std::net::UdpSocket::bind(listen).map_err(|e| ServerError::Bind(listen, e))?;
    let (endpoint, granted) =
        bkp_common::quic::endpoint(socket, Some(cfg)).map_err(|e| ServerError::Bind(listen, e))?;
    if granted < bkp_common::quic::SOCKET_BUFFER_BYTES / 2 {
        tracing::warn!(
            "UDP receive buffer is {} KiB, below the {} KiB asked for: uploads from several hosts at once \
             may lose datagrams and slow down; raise it with `sysctl -w net.core.rmem_max={}`",
            granted >> 10,
            bkp_common::quic::SOCKET_BUFFER_BYTES >> 10,
            bkp_common::quic::SOCKET_BUFFER_BYTES
        );
    }
    Ok(endpoint)
}

/// Everything `bkp-server serve` runs: the QUIC endpoint, the control
/// socket, the job scheduler, the monitor (alerts) and, when configured,
/// the monitoring HTTP endpoint, until `shutdown` resolves.
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Bound first: a taken port fails the start before anything runs.
    let http = match state.config().monitor.listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding the monitoring address {addr}: {e}")))?,
        ),
    };
    let control = crate::control::bind(state.data_dir())?;
    let mut tasks = vec![
        tokio::spawn(crate::control::serve(control, state.clone())),
        tokio::spawn(crate::schedule::run(state.clone(), Arc::new(crate::schedule::SystemClock))),
        tokio::spawn(crate::schedule::run_sync(state.clone(), Arc::new(crate::schedule::SystemClock))),
        tokio::spawn(monitor(state.clone())),
    ];
    if let Some(l) = http {
        let addr = l.local_addr()?;
        *state.monitor().http_addr.lock().expect("http addr lock") = Some(addr);
        info!("metrics on http://{addr}/metrics");
        let st = state.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::http::serve(l, st).await {
                warn!("monitoring endpoint stopped: {e}");
            }
        }));
    }
    let data = state.data_dir().to_path_buf();
    run(endpoint, state, shutdown).await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(crate::control::socket_path(&data));
    Ok(())
}

/// Serves connections until `shutdown` resolves, then closes them and
/// waits (briefly) for in-flight work. Also watches the token file, so
/// revocations reach open connections.
pub async fn run(endpoint: quinn::Endpoint, state: Arc<ServerState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    info!(addr = ?endpoint.local_addr().ok(), "serving");
    let watcher = tokio::spawn(watch_tokens(state.clone()));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                // Nothing is kept for an address until it has answered a
                // retry: a datagram with a forged source costs one reply.
                if !inc.remote_address_validated() {
                    if inc.may_retry() {
                        if let Err(e) = inc.retry() {
                            debug!("retry not sent: {e}");
                        }
                    } else {
                        inc.ignore();
                    }
                    continue;
                }
                let slot = state.limits().pending(inc.remote_address().ip());
                let state = state.clone();
                tokio::spawn(crate::connection::handle(inc, state, slot));
            }
        }
    }
    watcher.abort();
    let _ = watcher.await;
    endpoint.close(0u32.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    info!("stopped");
}

/// Runs the monitor's check every `check_interval`, or sooner when nudged
/// (after a commit, a job, a reported push failure).
async fn monitor(state: Arc<ServerState>) {
    loop {
        let st = state.clone();
        match tokio::task::spawn_blocking(move || crate::monitor::check(&st.monitor_inputs(&st.config()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("monitor check: {e}"),
            Err(e) => error!("monitor check panicked: {e}"),
        }
        tokio::select! {
            // Read each time: a reload may change it.
            _ = tokio::time::sleep(state.config().monitor.check_interval) => {}
            _ = state.monitor().nudge.notified() => {}
        }
    }
}

/// How often the token file is checked for revocations.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Watches the token file (shared with `bkp-server token revoke`, which
/// may run in another process) and closes the connections of tokens that
/// are no longer in it, ending their push sessions without a commit.
pub async fn watch_tokens(state: Arc<ServerState>) {
    let tokens = state.tokens();
    let path = tokens.file();
    let mut stamp = None;
    let mut known: Option<HashMap<String, String>> = None;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = file_stamp(&path);
        if known.is_none() || now != stamp {
            let t = tokens.clone();
            match tokio::task::spawn_blocking(move || t.list()).await {
                Ok(Ok(list)) => {
                    let fresh: HashMap<String, String> = list.into_iter().map(|r| (r.id, r.host)).collect();
                    // Tokens with open connections are reported when those
                    // are closed, below.
                    for (id, host) in known.iter().flatten().filter(|(id, _)| !fresh.contains_key(*id)) {
                        if state.limits().connections_of(id) == 0 {
                            info!(token = %id, %host, "token revoked");
                        }
                    }
                    known = Some(fresh);
                    stamp = now;
                }
                Ok(Err(e)) => {
                    if now != stamp {
                        warn!("reading tokens to apply revocations: {e}");
                    }
                    stamp = now;
                }
                Err(e) => warn!("token watcher: {e}"),
            }
        }
        let Some(valid) = &known else { continue };
        let valid: HashSet<String> = valid.keys().cloned().collect();
        for (id, host, n) in state.limits().close_revoked(&valid) {
            warn!(token = %id, %host, connections = n, "token revoked: closing its connections, ending its push sessions");
            let st = state.clone();
            let _ = tokio::task::spawn_blocking(move || st.sessions().end_token(&id)).await;
        }
    }
}

/// What changes when the token file is rewritten (it is replaced by a
/// rename, so the inode changes even within one mtime tick).
fn file_stamp(path: &std::path::Path) -> Option<(u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}
