//! The `bkp-server` command line. `main` only calls [`main`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use bkp_common::names::escape;
use bkp_common::protocol::Role;
use clap::{Parser, Subcommand};

use crate::alerts::rfc3339 as fmt_time;
use crate::audit::{Event, Line};
use crate::config::{ConfigSource, ServerConfig};
use crate::control::{ControlRequest, ControlResponse};
use crate::jobs::{JobKind, JobRecord, Report};
use crate::server::bind;
use crate::state::ServerState;
use crate::tokens::Tokens;
use crate::verify::Scope;

#[derive(Parser)]
#[command(name = "bkp-server", version, about = "bkp backup server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: TLS key and certificate, empty store.
    Init {
        #[arg(long)]
        data: PathBuf,
    },
    /// Serve clients over QUIC.
    Serve {
        #[arg(long)]
        data: PathBuf,
        /// Listen address (default 127.0.0.1:7443, or the config's).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Server config (default: DATA/server.toml when present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply retention policies (through the running server if there is one).
    Prune {
        #[arg(long)]
        data: PathBuf,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// Config with the [retention] policies, when no server is running
        /// (default: DATA/server.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Free chunks no snapshot references, and their disk space.
    Gc {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Prove backups restorable: scrub stored chunks and rebuild snapshots
    /// (through the running server if there is one). Exits non-zero when
    /// damage is found.
    Verify {
        #[arg(long)]
        data: PathBuf,
        /// Every chunk and every snapshot (default: the next scheduled
        /// slice and the configured drill sample).
        #[arg(long, conflicts_with = "sample")]
        full: bool,
        /// Only a restore drill: the newest snapshot of each set plus this
        /// share (0 to 1) of the older ones.
        #[arg(long, value_name = "SHARE", value_parser = parse_share)]
        sample: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// Copy another server's snapshots now: runs the `[[sync]]` job
    /// NAME of the server config (through the running server if there is
    /// one). Exits non-zero when a snapshot could not be copied.
    Sync {
        #[arg(long)]
        data: PathBuf,
        /// The job's `name` in `[[sync]]`.
        #[arg(long, value_name = "NAME")]
        remote: String,
        #[arg(long)]
        json: bool,
        /// Config with the [[sync]] jobs, when no server is running
        /// (default: DATA/server.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List recent job runs.
    Jobs {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Status at a glance: sets and their freshness, jobs, verification,
    /// damage, space and firing alerts (through the running server if
    /// there is one). Exits non-zero when an alert is firing.
    Status {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
        /// Config with the [freshness] and [alerts] settings, when no
        /// server is running (default: DATA/server.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Make the running server read its config file again (as SIGHUP and
    /// `systemctl reload` do) and print what changed: retention, jobs,
    /// verify, freshness, alerts and the monitor's intervals take effect
    /// at once; listeners, storage, cache, limits and audit settings need a
    /// restart. A file that does not load is refused and the running
    /// config stays (exit status 1).
    Reload {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Manage host tokens (works whether or not `serve` is running).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Report what of the database is intact, per column family (read
    /// only; works on a database the server refuses to open). Exits
    /// non-zero when anything is damaged.
    Check {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the audit log (token changes, admin actions, job runs,
    /// refused requests), oldest first.
    Audit {
        #[arg(long)]
        data: PathBuf,
        /// Only lines at or after this RFC 3339 time, or this long ago (24h).
        #[arg(long, value_parser = crate::audit::parse_since)]
        since: Option<u64>,
        /// One JSON object a line, as stored.
        #[arg(long)]
        json: bool,
    },
    /// A new data directory from the bucket alone ([storage] backend s3):
    /// every committed snapshot back, from the pack indexes and snapshot
    /// records. Tokens and the TLS key are new (clients need both again).
    Rebuild {
        /// A new (or empty) data directory.
        #[arg(long)]
        data: PathBuf,
        /// The server config whose [storage] names the bucket.
        #[arg(long)]
        config: PathBuf,
        /// The old server crashed (its lease on the bucket prefix is not
        /// released): take the lease over as soon as it has missed a
        /// renewal (about 2 min after the crash) instead of waiting for it
        /// to expire (5 min). Refused while the old server still renews it.
        #[arg(long)]
        take_over_lease: bool,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the database from what is intact; the damaged one is kept
    /// aside as db.damaged-<time>. Stop the server first.
    Salvage {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it once.
    Create {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "push")]
        role: Role,
    },
    List {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by the id that `list` shows.
    Revoke {
        #[arg(long)]
        data: PathBuf,
        id: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before anything is created: RocksDB's files, tokens, the socket.
    crate::perms::private_umask();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bkp-server: {e:#}");
            match e.downcast_ref::<TempFail>() {
                Some(_) => ExitCode::from(EX_TEMPFAIL),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Exit status of a job command refused because a run of its kind is in
/// progress (sysexits' EX_TEMPFAIL: try again later).
pub const EX_TEMPFAIL: u8 = 75;

/// A job that did not start because one of its kind was running.
#[derive(Debug)]
struct TempFail(String);

impl std::fmt::Display for TempFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TempFail {}

fn init(data: &Path) -> Result<()> {
    crate::perms::private_dir(data)
        .with_context(|| format!("creating {} with mode 0700 (it must belong to this user)", data.display()))?;
    let fp = crate::tls::init(data)?;
    // Create the store now so that a bad directory fails here, not at serve.
    drop(ServerState::open(data, ServerConfig::default())?);
    println!("initialised {}", data.display());
    println!("certificate fingerprint (give it to clients as BKP_FINGERPRINT):");
    println!("{fp}");
    Ok(())
}

fn execute(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { data } => init(&data),
        Cmd::Serve { data, listen, config } => {
            let _serve_lock = crate::control::lock_serve(&data)?;
            crate::logging::init();
            if let Some(w) = crate::perms::warning(&data) {
                tracing::warn!("{w}");
            }
            let source = ConfigSource { explicit: config, listen_fixed: listen.is_some() };
            let mut cfg = source.load(&data)?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                let shutdown = shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;
                let state = ServerState::open_from(&data, cfg.clone(), source)?;
                crate::control::start_delay_for_tests();
                let endpoint = bind(&data, cfg.listen)?;
                eprintln!("bkp-server listening on {}", endpoint.local_addr()?);
                let hangup = tokio::spawn(reload_on_hangup(state.clone()));
                crate::server::serve(endpoint, state, shutdown).await.context("serving")?;
                hangup.abort();
                Ok(())
            })
        }
        Cmd::Prune { data, dry_run, json, config } => {
            let cfg = || load_config(&data, config.as_deref());
            job(&data, ControlRequest::Run { kind: JobKind::Prune, dry_run, user: cli_user() }, cfg, json)
        }
        Cmd::Gc { data, json } => job(
            &data,
            ControlRequest::Run { kind: JobKind::Gc, dry_run: false, user: cli_user() },
            || load_config(&data, None),
            json,
        ),
        Cmd::Verify { data, full, sample, json } => {
            let scope = match (full, sample) {
                (true, _) => Scope::Full,
                (false, Some(share)) => Scope::Sample { share },
                (false, None) => Scope::Scheduled,
            };
            job(&data, ControlRequest::Verify { scope, user: cli_user() }, || load_config(&data, None), json)
        }
        Cmd::Sync { data, remote, json, config } => job(
            &data,
            ControlRequest::Sync { remote, user: cli_user() },
            || load_config(&data, config.as_deref()),
            json,
        ),
        Cmd::Jobs { data, limit, json } => {
            job(&data, ControlRequest::Jobs { limit }, || load_config(&data, None), json)
        }
        Cmd::Status { data, json, config } => status(&data, || load_config(&data, config.as_deref()), json),
        Cmd::Reload { data, json } => reload(&data, json),
        Cmd::Check { data, json } => check_store(&data, json),
        Cmd::Salvage { data, json } => salvage_store(&data, json),
        Cmd::Rebuild { data, config, take_over_lease, json } => rebuild_store(&data, &config, take_over_lease, json),
        Cmd::Audit { data, since, json } => print_audit(&data, since, json),
        Cmd::Token { cmd } => match cmd {
            TokenCmd::Create { data, host, role } => {
                let made = Tokens::new(&data).create(&host, role);
                let line = match &made {
                    Ok((_, rec)) => {
                        Line::new(Event::TokenCreate, "ok").token(&rec.id).detail(format!("role {}", role.as_str()))
                    }
                    Err(e) => Line::new(Event::TokenCreate, "failed").detail(e.to_string()),
                };
                cli_audit(&data, line.host(&host));
                let (token, rec) = made?;
                eprintln!(
                    "created {} token {} for host {}; it is shown only once:",
                    role.as_str(),
                    rec.id,
                    escape(&host)
                );
                println!("{token}");
                Ok(())
            }
            TokenCmd::List { data, json } => {
                let list = Tokens::new(&data).list();
                cli_audit(
                    &data,
                    match &list {
                        Ok(l) => Line::new(Event::TokenList, "ok").detail(format!("{} tokens", l.len())),
                        Err(e) => Line::new(Event::TokenList, "failed").detail(e.to_string()),
                    },
                );
                let list = list?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    println!("{:<14} {:<24} {:<8} CREATED", "ID", "HOST", "ROLE");
                    for r in list {
                        println!("{:<14} {:<24} {:<8} {}", escape(&r.id), escape(&r.host), r.role.as_str(), r.created);
                    }
                }
                Ok(())
            }
            TokenCmd::Revoke { data, id } => {
                let r = Tokens::new(&data).revoke(&id);
                cli_audit(
                    &data,
                    match &r {
                        Ok(r) => Line::new(Event::TokenRevoke, "ok").token(&r.id).host(&r.host),
                        Err(e) => Line::new(Event::TokenRevoke, "failed").token(&id).detail(e.to_string()),
                    },
                );
                let r = r?;
                eprintln!("revoked token {} of host {}", escape(&r.id), escape(&r.host));
                Ok(())
            }
        },
    }
}

/// A CLI action's audit line, written before the command returns. A
/// failure to write is reported and does not fail the command.
fn cli_audit(data: &Path, line: Line) {
    let cfg = load_config(data, None).map(|c| c.audit).unwrap_or_default();
    if let Err(e) = crate::audit::append(data, &cfg, &line) {
        eprintln!(
            "bkp-server: audit log {}: {e}; this action was not recorded",
            data.join(crate::audit::FILE).display()
        );
    }
}

/// `bkp-server audit`.
fn print_audit(data: &Path, since: Option<u64>, json: bool) -> Result<()> {
    let lines = crate::audit::read(data).with_context(|| format!("reading the audit log in {}", data.display()))?;
    let mut bad = 0;
    if !json {
        println!("{:<20} {:<14} {:<9} {:<12} {:<16} {:<22} DETAIL", "TIME", "EVENT", "RESULT", "TOKEN", "HOST", "PEER");
    }
    for l in lines {
        let l = match l {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bkp-server: {}", escape(&e.to_string()));
                bad += 1;
                continue;
            }
        };
        if since.is_some_and(|s| l.unix_secs().unwrap_or(0) < s) {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&l)?);
        } else {
            let o = |v: &Option<String>| escape(v.as_deref().unwrap_or("-"));
            println!(
                "{:<20} {:<14} {:<9} {:<12} {:<16} {:<22} {}",
                escape(&l.time),
                l.event.as_str(),
                escape(&l.result),
                o(&l.token),
                o(&l.host),
                o(&l.peer),
                o(&l.detail)
            );
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} audit lines could not be read (see above); the others are shown");
    }
    Ok(())
}

/// `--config FILE`, else `DATA/server.toml` when present, else defaults.
fn load_config(data: &Path, explicit: Option<&Path>) -> Result<ServerConfig> {
    Ok(ConfigSource { explicit: explicit.map(Path::to_path_buf), listen_fixed: false }.load(data)?)
}

/// `bkp-server reload`: through the control socket only (there is
/// nothing to reload without a running server).
fn reload(data: &Path, json: bool) -> Result<()> {
    let req = ControlRequest::Reload { user: cli_user() };
    let Some(answer) = crate::control::call(data, &req) else {
        anyhow::bail!(
            "no bkp-server is serving {} (its control socket does not answer); a server reads its config when it \
             starts",
            data.display()
        );
    };
    match answer? {
        ControlResponse::Reloaded(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let file = r.file.as_deref().unwrap_or("the defaults (no config file)");
                println!("reloaded {}: {}", escape(file), r.summary());
            }
            Ok(())
        }
        ControlResponse::Error(e) => anyhow::bail!("{e}"),
        _ => anyhow::bail!("the server answered a reload with something else; is it the same version?"),
    }
}

/// SIGHUP (`systemctl reload`): reads the config again; the outcome is
/// in the log and the audit log.
async fn reload_on_hangup(state: std::sync::Arc<ServerState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return tracing::error!("no config reload on SIGHUP: installing its handler: {e}"),
    };
    while hup.recv().await.is_some() {
        let st = state.clone();
        // The outcome is logged by `reload` itself.
        let _ = tokio::task::spawn_blocking(move || st.reload("signal SIGHUP")).await;
    }
}

/// Who runs this command, as the audit log names it: the user behind sudo
/// first, since the uid is then root's.
fn cli_user() -> Option<String> {
    ["SUDO_USER", "USER", "LOGNAME"].iter().find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
}

/// How long a job command waits for a starting server's control socket.
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a control request through the running server, or locally when
/// none is running (with the config `cfg` loads: only then, so a running
/// server answers even while the file on disk does not load). A server
/// that is starting (it holds `serve.lock` or the database, but its
/// socket is not up yet) is waited for.
fn reach(data: &Path, req: ControlRequest, cfg: impl Fn() -> Result<ServerConfig>) -> Result<ControlResponse> {
    let deadline = std::time::Instant::now() + START_WAIT;
    let mut told = false;
    loop {
        if let Some(r) = crate::control::call(data, &req) {
            return Ok(r?);
        }
        if !crate::control::serve_running(data) {
            match ServerState::open(data, cfg()?) {
                Ok(state) => {
                    let by = format!("cli uid={}", nix::unistd::getuid());
                    return Ok(crate::control::answer(&state, req, &by));
                }
                // Unless a serve took the database after the check above
                // (another job command holding it is an error).
                Err(e) if !crate::control::serve_running(data) => return Err(e.into()),
                Err(_) => {}
            }
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "a bkp-server is running on {} but its control socket did not answer within {} s; check its log",
                data.display(),
                START_WAIT.as_secs()
            );
        }
        if !told {
            eprintln!(
                "bkp-server: the server on {} is starting; waiting up to {} s for its control socket",
                data.display(),
                START_WAIT.as_secs()
            );
            told = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn job(data: &Path, req: ControlRequest, cfg: impl Fn() -> Result<ServerConfig>, json: bool) -> Result<()> {
    match reach(data, req, cfg)? {
        ControlResponse::Error(e) => anyhow::bail!(e),
        ControlResponse::Job(rec) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            }
            if rec.refused {
                // Not a failure: the run in progress does the work.
                let e = rec.error.unwrap_or_default();
                return Err(TempFail(format!("{} not started: {e}", rec.kind.as_str())).into());
            }
            if !json {
                print_job(&rec);
            }
            if let Some(e) = rec.error {
                anyhow::bail!(e);
            }
            Ok(())
        }
        ControlResponse::Status(_) | ControlResponse::Reloaded(_) => {
            anyhow::bail!("the server answered a job request with something else; is it the same version?")
        }
        ControlResponse::Jobs(list) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<22} {:<6} {:<7} {:>9}  RESULT", "START", "KIND", "STATUS", "SECONDS");
                for r in &list {
                    let secs = (r.end_ns.saturating_sub(r.start_ns)) as f64 / 1e9;
                    let status = match (r.ok, r.refused) {
                        (_, true) => "refused",
                        (true, _) => "ok",
                        _ => "failed",
                    };
                    let detail = r.error.clone().unwrap_or_else(|| summary(r));
                    println!(
                        "{:<22} {:<6} {:<7} {:>9.1}  {}",
                        fmt_time(r.start_ns),
                        r.kind.as_str(),
                        status,
                        secs,
                        escape(&detail)
                    );
                }
            }
            Ok(())
        }
    }
}

fn status(data: &Path, cfg: impl Fn() -> Result<ServerConfig>, json: bool) -> Result<()> {
    let s = match reach(data, ControlRequest::Status, cfg)? {
        ControlResponse::Status(s) => s,
        ControlResponse::Error(e) => anyhow::bail!(e),
        _ => anyhow::bail!("the server answered a status request with something else; is it the same version?"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    if !s.alerts.is_empty() {
        anyhow::bail!("{} alert(s) firing", s.alerts.len());
    }
    Ok(())
}

fn print_status(s: &crate::status::ServerStatus) {
    use crate::status::{ago, bytes};
    println!("{:<32} {:<9} {:>9} {:<8} {:>11} {:>6}  NEWEST", "SET", "NEWEST", "AGE", "STATE", "SIZE", "SNAPS");
    for set in &s.sets {
        let mut state = set.freshness.as_str().to_string();
        if set.damaged > 0 {
            state = format!("{state}, {} damaged", set.damaged);
        }
        if set.skipped > 0 {
            state = format!("{state}, incomplete ({} skipped)", set.skipped);
        }
        if let Some(o) = &set.copy_of {
            state = format!("{state}, copy from {o}");
        }
        println!(
            "{:<32} {:<9} {:>9} {:<8} {:>11} {:>6}  {}",
            escape(&format!("{}/{}", set.host, set.name)),
            set.newest_id.get(..8).unwrap_or(""),
            ago(set.age_secs),
            state,
            bytes(set.size_bytes),
            set.snapshots,
            fmt_time(set.newest_ns)
        );
    }
    println!();
    for j in &s.jobs {
        let last = match &j.last {
            None => "never run".to_string(),
            Some(r) if r.ok => format!("ok at {}", fmt_time(r.start_ns)),
            Some(r) => format!("FAILED at {}: {}", fmt_time(r.start_ns), escape(r.error.as_deref().unwrap_or(""))),
        };
        println!("job {:<7} {last}{}", j.kind, if j.scheduled { " (scheduled)" } else { "" });
    }
    for j in &s.sync {
        let when = |ns: u64| if ns == 0 { "never".to_string() } else { fmt_time(ns) };
        println!(
            "sync {} from {}: {} copies here; last run {}, last success {}; {} set(s) lagging",
            escape(&j.name),
            escape(&j.server),
            j.copies,
            when(j.last_run_ns),
            when(j.last_ok_ns),
            j.lagging_sets
        );
    }
    let v = &s.verify;
    let cycle = if v.scrub_last_cycle_end_ns == 0 { "never".into() } else { fmt_time(v.scrub_last_cycle_end_ns) };
    let drill = match (v.drill_last_ns, v.drill_snapshots) {
        (Some(t), Some(n)) => format!("{n} snapshots at {}", fmt_time(t)),
        (Some(t), None) => format!("last run {}", fmt_time(t)),
        _ => "never run".into(),
    };
    println!("verify: scrub {:.0}% of this cycle, last full pass {cycle}; drill {drill}", v.scrub_coverage * 100.0);
    for d in &s.damaged {
        println!(
            "damaged snapshot {} {}/{} of {}: {}",
            d.id.get(..8).unwrap_or(""),
            escape(&d.host),
            escape(&d.name),
            fmt_time(d.time_ns),
            escape(&d.paths.join(", "))
        );
    }
    if s.quarantined_chunks > 0 {
        println!("{} chunk(s) quarantined", s.quarantined_chunks);
    }
    let sp = &s.space;
    let disk = match (sp.disk_free_bytes, sp.disk_total_bytes) {
        (Some(f), Some(t)) => format!("; disk {} free of {}", bytes(f), bytes(t)),
        _ => String::new(),
    };
    println!(
        "space: {} backed up, {} chunks ({} stored), store {} on disk{disk}",
        bytes(sp.logical_bytes),
        sp.chunks,
        bytes(sp.stored_bytes),
        bytes(sp.store_disk_bytes)
    );
    if s.alerts.is_empty() {
        println!("no alert firing");
    }
    for a in &s.alerts {
        println!("ALERT {}: {}", a.kind, escape(&a.summary));
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1 (0.1 drills a tenth of the older snapshots)")),
    }
}

fn summary(r: &JobRecord) -> String {
    match &r.figures {
        None => "no report".to_string(),
        Some(Report::Prune(f)) => format!("{} kept, {} removed in {} sets", f.kept, f.removed, f.sets),
        Some(Report::Gc(f)) => {
            let packs = if f.pack_objects_deleted + f.packs_repacked > 0 {
                format!(
                    "; bucket: {} pack objects deleted, {} packs repacked ({} bytes rewritten)",
                    f.pack_objects_deleted, f.packs_repacked, f.pack_bytes_rewritten
                )
            } else {
                String::new()
            };
            format!(
                "{} chunks freed ({} bytes), disk {} -> {} bytes, {} bytes rewritten ({} of them live chunks \
                 relocated){packs}",
                f.chunks_deleted,
                f.bytes_freed,
                f.disk_bytes_before,
                f.disk_bytes_after,
                f.bytes_rewritten,
                f.bytes_relocated
            )
        }
        Some(Report::Verify(f)) => {
            let scrub = match &f.scrub {
                Some(s) => {
                    format!("{} chunks scrubbed (cycle {:.0}% covered), ", s.chunks_checked, s.coverage * 100.0)
                }
                None => String::new(),
            };
            format!(
                "{scrub}{} snapshots drilled ({} files, {} bytes), {} bad chunks, {} snapshots damaged, {} healed",
                f.snapshots_drilled,
                f.files_checked,
                f.bytes_restored,
                f.bad_chunks.len(),
                f.damaged_total,
                f.healed.len()
            )
        }
        Some(Report::Sync(f)) => format!(
            "{}: {} snapshots copied, {} skipped, {} older refused, {} failed, {} removed; {} chunks ({} bytes) \
             transferred, {} held here for another host",
            f.remote,
            f.snapshots_copied,
            f.snapshots_skipped,
            f.snapshots_older,
            f.snapshots_failed,
            f.snapshots_removed,
            f.chunks_transferred,
            f.bytes_transferred,
            f.chunks_adopted
        ),
        // A report of another version: its JSON, escaped (names come from clients).
        Some(Report::Other(v)) => escape(&v.to_string()),
    }
}

fn print_job(r: &JobRecord) {
    if let Some(Report::Prune(f)) = &r.figures {
        for set in &f.plan {
            println!("{}/{}:", escape(&set.host), escape(&set.name));
            for v in &set.verdicts {
                let reasons: Vec<String> = v
                    .keep
                    .iter()
                    .map(|k| {
                        serde_json::to_value(k).ok().and_then(|j| j.as_str().map(String::from)).unwrap_or_default()
                    })
                    .collect();
                let verb = if reasons.is_empty() { "remove" } else { "keep  " };
                println!("  {verb} {} {} {}", v.id.short(), fmt_time(v.time_ns), reasons.join(","));
            }
        }
    }
    if let Some(Report::Verify(f)) = &r.figures {
        for b in &f.bad_chunks {
            println!("bad chunk {} (quarantined): {}", b.id, escape(&b.reason));
        }
        for a in &f.affected {
            println!(
                "damaged snapshot {} {}/{} of {}:",
                a.id.short(),
                escape(&a.damage.host),
                escape(&a.damage.name),
                fmt_time(a.damage.time_ns)
            );
            for p in &a.damage.paths {
                println!("  {}", escape(p));
            }
            if a.damage.more_paths > 0 {
                println!("  ... and {} more paths", a.damage.more_paths);
            }
        }
    }
    if let Some(Report::Sync(f)) = &r.figures {
        for x in &f.failures {
            println!(
                "not copied: {} {}/{}: {}",
                x.id.get(..8).unwrap_or(""),
                escape(&x.host),
                escape(&x.name),
                escape(&x.error)
            );
        }
    }
    let dry = if r.dry_run { " (dry run: nothing changed)" } else { "" };
    println!("{}: {}{dry}", r.kind.as_str(), summary(r));
}

fn print_cfs(cfs: &[crate::store::salvage::CfReport]) {
    println!("{:<12} {:>10} {:>8} {:>10}  STATUS", "COLUMN", "READABLE", "INVALID", "UNREADABLE");
    for c in cfs {
        let status = c.error.as_deref().map_or_else(
            || if c.intact() { "ok".to_string() } else { "damaged".to_string() },
            |e| format!("damaged: {e}"),
        );
        println!("{:<12} {:>10} {:>8} {:>10}  {status}", c.name, c.readable, c.invalid, c.unreadable);
    }
}

/// `bkp-server check`.
fn check_store(data: &Path, json: bool) -> Result<()> {
    let db = data.join(crate::state::DB_DIR);
    let report = crate::store::salvage::check(&db)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_cfs(&report.cfs);
    }
    if !report.intact() {
        anyhow::bail!(
            "the database in {} is damaged; stop the server and run `bkp-server salvage --data {}` to rebuild it \
             from what is intact",
            db.display(),
            data.display()
        );
    }
    if !json {
        println!("the database in {} is intact", db.display());
    }
    Ok(())
}

/// `bkp-server salvage`.
fn rebuild_store(data: &Path, config: &Path, take_over_lease: bool, json: bool) -> Result<()> {
    let cfg = ServerConfig::load(config)?;
    if cfg.storage.backend != crate::store::object::config::Backend::S3 {
        anyhow::bail!("{}: [storage] backend is not \"s3\"; rebuild reads a bucket", config.display());
    }
    crate::perms::private_dir(data)
        .with_context(|| format!("creating {} with mode 0700 (it must belong to this user)", data.display()))?;
    let _serve = crate::control::lock_serve(data).map_err(|e| anyhow::anyhow!("rebuild not started: {e}"))?;
    crate::logging::init();
    let fp = match crate::tls::load_cert(data) {
        Ok(c) => crate::tls::fingerprint(&c),
        Err(_) => crate::tls::init(data)?,
    };
    let db = data.join(crate::state::DB_DIR);
    let r = crate::store::s3::rebuild::rebuild(&db, cfg.cache_mb << 20, &cfg.storage, data, take_over_lease)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "rebuilt {}: {} snapshots of {} hosts, {} chunks in {} packs ({} unreferenced chunks left to gc)",
        data.display(),
        r.snapshots,
        r.hosts,
        r.chunks_located,
        r.packs,
        r.chunks_unreferenced
    );
    if r.packs_unreadable + r.records_bad + r.snapshots_incomplete > 0 {
        println!(
            "{} pack(s) unreadable, {} snapshot record(s) bad, {} snapshot(s) incomplete (see the log); run \
             `bkp-server verify --full` once the server runs",
            r.packs_unreadable, r.records_bad, r.snapshots_incomplete
        );
    }
    println!("next: create tokens again (`bkp-server token create`), give clients the new fingerprint:");
    println!("{fp}");
    println!("and start the server with `--config {}`", config.display());
    Ok(())
}

fn salvage_store(data: &Path, json: bool) -> Result<()> {
    let db = data.join(crate::state::DB_DIR);
    // Held for the whole rebuild: a `serve` started meanwhile would write
    // into the database that salvage then moves aside.
    let _serve = crate::control::lock_serve(data).map_err(|e| anyhow::anyhow!("salvage not started: {e}"))?;
    let r = crate::store::salvage::salvage(&db)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("read from the damaged database:");
    print_cfs(&r.read.cfs);
    println!(
        "rebuilt {}: {} snapshots ({} index entries rebuilt, {} dropped), {} chunks ({} metas rebuilt, {} dropped), \
         {} possession records added",
        db.display(),
        r.snapshots,
        r.summaries_rebuilt,
        r.summaries_dropped,
        r.chunks,
        r.metas_rebuilt,
        r.metas_dropped,
        r.possession_added
    );
    if r.snapshots_incomplete > 0 {
        println!(
            "{} snapshots reference chunks that were lost: run `bkp-server verify --full` after starting the server, \
             then push again from their hosts",
            r.snapshots_incomplete
        );
    }
    println!("the damaged database is kept at {}; delete it once the server runs well", r.damaged_kept_at);
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now, and returns what waits
/// for either. Installed before anything says "serving": a supervisor
/// (or a test) that stops the server as soon as it is up must not find
/// the signal lost or the default action killing it mid-start.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// The clap definition, for generating man pages and shell completions
/// (xtask/).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
