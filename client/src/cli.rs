//! The `bkp` command line. Silent on success unless `--verbose`; a
//! one-line reason and a non-zero exit on failure; `--json` for scripts.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::{Context, Result};
use bkp_common::names::{escape, escape_bytes};
use bkp_common::snapshot::{SnapshotKind, SnapshotSummary};
use bkp_common::tree::Entry;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::browse;
use crate::config::{ClientConfig, FileConfig};
use crate::conn::Client;
use crate::progress::{Progress, Silent};
use crate::push::incremental::CacheSpec;
use crate::push::{push_with, ExcludeSpec, PushOptions, Source};
use crate::restore::progress_bar::restore_progress;
use crate::restore::snapshot_spec::resolve;
use crate::restore::{restore, verify, RestoreOptions, TreeReader};

#[derive(Parser)]
#[command(name = "bkp", version, about = "bkp backup client")]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print a summary line on success.
    #[arg(long, short, global = true)]
    verbose: bool,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct ConnArgs {
    /// Server address, host:port [env: BKP_SERVER]
    #[arg(long, global = true)]
    server: Option<String>,
    /// SHA-256 fingerprint of the server certificate [env: BKP_FINGERPRINT]
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    /// Trust a CA file instead of pinning a fingerprint.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Token [env: BKP_TOKEN]; prefer --token-file, which ps cannot show.
    #[arg(long, global = true)]
    token: Option<String>,
    /// File holding the token [env: BKP_TOKEN_FILE]
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Client config file [env: BKP_CONFIG] (default ~/.config/bkp/client.toml,
    /// /etc/bkp/client.toml; /dev/null reads none).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// How long to keep trying a server that does not answer, e.g. 90s,
    /// 10m [default: 5m, or `timeout` in client.toml].
    #[arg(long, global = true)]
    timeout: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up file trees, stdin, or a command's output.
    Push {
        /// Backup set name [default: "files" for trees].
        #[arg(long)]
        name: Option<String>,
        /// Read the backup from standard input.
        #[arg(long, conflicts_with = "paths")]
        stdin: bool,
        /// Skip paths matching this glob (a name anywhere, or an absolute path).
        #[arg(long)]
        exclude: Vec<String>,
        /// Skip files and directories with the nodump flag (`chattr +d`), as dump(8) does.
        #[arg(long)]
        skip_nodump: bool,
        /// Read more --exclude patterns from FILE, one a line (`#`: a comment).
        #[arg(long, value_name = "FILE")]
        exclude_file: Vec<PathBuf>,
        /// Skip every directory that holds an entry called NAME (e.g. .nobackup).
        #[arg(long, value_name = "NAME")]
        exclude_if_present: Vec<String>,
        /// Skip every directory holding a CACHEDIR.TAG with the standard signature.
        #[arg(long)]
        exclude_caches: bool,
        /// Stay on the file system of each PATH: mount points below it are
        /// kept as empty directories.
        #[arg(long, short = 'x')]
        one_file_system: bool,
        /// zstd level for new chunks.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(-7..=19))]
        level: i32,
        /// Read every file, even those the metadata cache says are
        /// unchanged (a fresh cache is still written).
        #[arg(long)]
        no_cache: bool,
        /// Directory of the metadata caches [env: BKP_CACHE_DIR]
        /// [default: $XDG_CACHE_HOME/bkp/client or ~/.cache/bkp/client].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Upload at most RATE bytes per second (10M, 2MiB, 500k) [env:
        /// BKP_LIMIT_UPLOAD] [default: limit_upload in client.toml, else none].
        #[arg(long, value_name = "RATE")]
        limit_upload: Option<String>,
        /// Files and directories to back up.
        paths: Vec<PathBuf>,
        /// Command whose standard output is the backup (after `--`).
        #[arg(last = true)]
        command: Vec<OsString>,
    },
    /// Run backup definitions ([[backup]] in client.toml): one, or all.
    Run {
        /// The definition's name.
        name: Option<String>,
        /// Every definition, one after the other; goes on after a failure.
        #[arg(long)]
        all: bool,
        /// Read every file, even those the metadata cache says are unchanged.
        #[arg(long)]
        no_cache: bool,
    },
    /// List snapshots.
    Snapshots {
        #[arg(long)]
        name: Option<String>,
        /// Another host's snapshots (admin tokens).
        #[arg(long)]
        host: Option<String>,
    },
    /// List the contents of a snapshot.
    Ls {
        snapshot: String,
        path: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a snapshot (admin tokens only); GC frees its data later.
    Forget {
        snapshot: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Protect a snapshot from prune (admin tokens only).
    Protect {
        snapshot: String,
        #[arg(long)]
        name: Option<String>,
        /// Lift the protection instead.
        #[arg(long)]
        remove: bool,
    },
    /// Restore a snapshot to a directory or to stdout.
    Restore {
        snapshot: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, required_unless_present_any = ["stdout", "verify_only"], conflicts_with = "stdout")]
        target: Option<PathBuf>,
        #[arg(long)]
        stdout: bool,
        /// Fetch and check every chunk and every file's content hash,
        /// writing nothing: a restore drill. Fails listing what does not check out.
        #[arg(long, conflicts_with_all = ["target", "stdout"])]
        verify_only: bool,
        /// Restore only paths matching this glob, and what is below them
        /// (relative to the snapshot root as `bkp ls` prints them; without `/`:
        /// a name at any depth). A pattern that matches nothing is an error.
        #[arg(long)]
        include: Vec<String>,
        /// Leave out paths matching this glob, and what is below them.
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// What changed between two snapshots: + added, - removed, M content,
    /// U metadata only, T type.
    Diff {
        from: String,
        to: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Which snapshots hold paths matching a glob (as restore --include takes).
    Find {
        glob: String,
        /// Another host's snapshots (admin tokens).
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Only snapshots newer than this: an age (`7d`, `36h`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Write one file of a snapshot to stdout.
    Cat {
        snapshot: String,
        path: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Client-side encryption keys: init, add-passphrase, export --paper,
    /// import, check.
    Key {
        #[command(subcommand)]
        cmd: crate::crypt::commands::KeyCmd,
    },
    /// Mount the host's snapshots read-only (FUSE) at DIR, until Ctrl-C,
    /// SIGTERM or `fusermount3 -u DIR`.
    Mount {
        dir: PathBuf,
        /// Another host's snapshots (admin tokens).
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    install_log();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bkp: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The reason may quote a name from a snapshot or the server.
            eprintln!("bkp: {}", escape(&format!("{e:#}")));
            ExitCode::from(e.downcast_ref::<crate::run::Exit>().map_or(1, crate::run::Exit::code))
        }
    }
}

/// Debug logging to stderr only when `BKP_LOG` asks for it (for example
/// `BKP_LOG=debug` or `BKP_LOG=bkp_client=debug,quinn=info`): from cron the
/// client's only output is its result line and its errors.
fn install_log() {
    let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("BKP_LOG") else {
        return;
    };
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

struct Bars {
    bar: ProgressBar,
    read: AtomicU64,
    /// Bytes of files taken unchanged from the cache: done, but not read.
    cached: AtomicU64,
    sent: AtomicU64,
    files: AtomicU64,
    /// The pre-scan's files and bytes so far, and whether it is done.
    total_files: AtomicU64,
    total_done: std::sync::atomic::AtomicBool,
}

impl Bars {
    fn refresh(&self) {
        let (r, s, f) = (self.read.load(Relaxed), self.sent.load(Relaxed), self.files.load(Relaxed));
        let done = r + self.cached.load(Relaxed);
        self.bar.set_position(done);
        let ratio = if s > 0 { r as f64 / s as f64 } else { 0.0 };
        let files = match (self.total_files.load(Relaxed), self.total_done.load(Relaxed)) {
            (0, false) => format!("{f} files"),
            (t, true) => format!("{f}/{t} files"),
            (t, false) => format!("{f}/{t}+ files"),
        };
        self.bar.set_message(format!("{files}, {} new, ratio {ratio:.1}x", indicatif::HumanBytes(s)));
    }
}

impl Progress for Bars {
    fn read(&self, b: u64) {
        self.read.fetch_add(b, Relaxed);
        self.refresh();
    }
    fn cached(&self, b: u64) {
        self.cached.fetch_add(b, Relaxed);
    }
    fn file_done(&self) {
        self.files.fetch_add(1, Relaxed);
    }
    fn wants_totals(&self) -> bool {
        true
    }
    fn totals(&self, files: u64, bytes: u64, done: bool) {
        self.total_files.store(files, Relaxed);
        self.total_done.store(done, Relaxed);
        // With a length the bar shows how far and an ETA; while the scan
        // runs the length only grows, so the ETA is a lower bound.
        if self.bar.length().is_none() {
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {msg}, {bytes_per_sec}, {elapsed} (ETA {eta})",
                )
                .expect("valid template"),
            );
        }
        self.bar.set_length(bytes.max(1));
        self.refresh();
    }
    fn uploaded(&self, b: u64) {
        self.sent.fetch_add(b, Relaxed);
        self.refresh();
    }
    fn restored(&self, b: u64) {
        self.bar.inc(b);
    }
}

fn progress() -> Arc<dyn Progress> {
    if !std::io::stderr().is_terminal() {
        return Arc::new(Silent);
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes} read, {msg}, {bytes_per_sec} {elapsed}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Arc::new(Bars {
        bar,
        read: 0.into(),
        cached: 0.into(),
        sent: 0.into(),
        files: 0.into(),
        total_files: 0.into(),
        total_done: false.into(),
    })
}

fn fmt_time(ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn flags(c: &ConnArgs, cache_dir: Option<PathBuf>) -> FileConfig {
    FileConfig {
        server: c.server.clone(),
        fingerprint: c.fingerprint.clone(),
        token: c.token.clone(),
        token_file: c.token_file.clone(),
        ca_file: c.ca_file.clone(),
        cache_dir,
        limit_upload: None,
        timeout: c.timeout.clone(),
        encryption: None,
        key_file: None,
        backup: Vec::new(),
    }
}

/// Connects; also returns the metadata cache directory.
async fn connect(c: &ConnArgs, cache_dir: Option<PathBuf>) -> Result<(Arc<Client>, Option<PathBuf>)> {
    let (cfg, cache_dir) = ClientConfig::resolve_with_cache(flags(c, cache_dir), c.config.as_deref())?;
    Ok((Arc::new(Client::connect(&cfg).await?), cache_dir))
}

async fn pick(client: &Client, spec: &str, name: Option<&str>) -> Result<bkp_common::SnapshotId> {
    let list = client.snapshots(None, name.map(str::to_string)).await?;
    Ok(resolve(spec, name, &list)?)
}

fn print_snapshots(list: &[SnapshotSummary]) {
    println!(
        "{:<10} {:<21} {:<16} {:<16} {:<7} {:>9} {:>12}  FLAGS",
        "ID", "TIME", "HOST", "NAME", "KIND", "FILES", "SIZE"
    );
    for s in list {
        let kind = if s.kind == SnapshotKind::Tree { "tree" } else { "stream" };
        println!(
            "{:<10} {:<21} {:<16} {:<16} {:<7} {:>9} {:>12}  {}",
            s.id.short(),
            fmt_time(s.time_ns),
            escape(&s.host),
            escape(&s.name),
            kind,
            s.stats.files,
            indicatif::HumanBytes(s.stats.bytes).to_string(),
            flags_of(s)
        );
    }
}

/// The FLAGS column: "protected", "incomplete (N skipped)".
fn flags_of(s: &SnapshotSummary) -> String {
    let mut f: Vec<String> = Vec::new();
    if s.protected {
        f.push("protected".into());
    }
    if let Some(i) = &s.incomplete {
        f.push(format!("incomplete ({} skipped)", i.skipped));
    }
    f.join(",")
}

/// Is `path` the stored path `prefix` or below it? (An empty prefix, from
/// `bkp ls SNAPSHOT /`, is the whole tree.)
fn within(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty() || path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}

async fn execute(cli: Cli) -> Result<()> {
    if let Cmd::Key { cmd } = &cli.cmd {
        return crate::crypt::commands::run(cmd, cli.conn.config.as_deref(), || async {
            Ok(connect(&cli.conn, None).await?.0)
        })
        .await;
    }
    // Reads open sealed chunks with the configured key; pushes seal with it.
    crate::crypt::setup::install(crate::crypt::setup::setting(cli.conn.config.as_deref())?);
    let cache_flag = match &cli.cmd {
        Cmd::Push { cache_dir, .. } => cache_dir.clone(),
        Cmd::Run { name, all, no_cache } => {
            let (json, verbose) = (cli.json, cli.verbose);
            let flags = flags(&cli.conn, None);
            let (name, config) = (name.clone(), cli.conn.config.clone());
            let args =
                crate::run::report::RunArgs { name, all: *all, no_cache: *no_cache, flags, config, json, verbose };
            return crate::run::report::run(args, progress).await;
        }
        _ => None,
    };
    // Checked before connecting: a bad rate fails at once.
    let limit = match &cli.cmd {
        Cmd::Push { limit_upload, .. } => {
            crate::config::upload_limit(limit_upload.as_deref(), cli.conn.config.as_deref())?
        }
        _ => 0,
    };
    let (mut client, cache_dir) = connect(&cli.conn, cache_flag).await?;
    if let Some(c) = Arc::get_mut(&mut client) {
        c.limit_upload(limit);
    }
    let result = run(&cli, client.clone(), cache_dir).await;
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    result
}

async fn run(cli: &Cli, client: Arc<Client>, cache_dir: Option<PathBuf>) -> Result<()> {
    match &cli.cmd {
        Cmd::Push {
            name,
            stdin,
            exclude,
            skip_nodump,
            exclude_file,
            exclude_if_present,
            exclude_caches,
            one_file_system,
            level,
            paths,
            command,
            no_cache,
            ..
        } => {
            let source = match (*stdin, paths.is_empty(), command.is_empty()) {
                (true, true, true) => Source::Stdin,
                (false, true, false) => Source::Command(command.clone()),
                (false, false, true) => Source::Paths {
                    paths: paths.clone(),
                    excludes: ExcludeSpec {
                        patterns: exclude.clone(),
                        files: exclude_file.clone(),
                        if_present: exclude_if_present.clone(),
                        caches: *exclude_caches,
                        one_file_system: *one_file_system,
                        skip_nodump: *skip_nodump,
                    },
                },
                _ => anyhow::bail!("give PATHs, --stdin, or -- CMD (exactly one)"),
            };
            let name = match (name, &source) {
                (Some(n), _) => n.clone(),
                (None, Source::Paths { .. }) => "files".to_string(),
                (None, _) => anyhow::bail!("--name is required for --stdin and -- CMD"),
            };
            let ids = crate::crypt::setup::push_ids().map_err(anyhow::Error::msg)?;
            let opts = PushOptions { name, source, zstd_level: *level, ids };
            let cache = cache_dir.map(|dir| CacheSpec { dir, read: !no_cache });
            let r = push_with(client, opts, cache, progress()).await?;
            crate::run::report::finish_push(&r, cli.json, cli.verbose)
        }
        // `execute` runs it: it connects once per definition.
        Cmd::Run { .. } => {
            anyhow::bail!("bkp run reached the one-connection commands; this is a bug in bkp, please report it")
        }
        Cmd::Snapshots { name, host } => {
            let list = client.snapshots(host.clone(), name.clone()).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_snapshots(&list);
            }
            Ok(())
        }
        Cmd::Ls { snapshot, path, name } => {
            let id = pick(&client, snapshot, name.as_deref()).await?;
            let snap = client.snapshot(id).await?;
            let prefix = path.as_deref().map(|p| p.trim_matches('/').to_string());
            let handle = tokio::runtime::Handle::current();
            let json = cli.json;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut r = TreeReader::new(client, handle, &snap);
                let mut size = 0u64;
                while let Some(e) = r.next_entry()? {
                    let (kind, p, mode) = match &e {
                        Entry::Dir { path, meta } => ("d", path, meta.mode),
                        Entry::File { path, meta, size: s } => {
                            size = *s;
                            ("-", path, meta.mode)
                        }
                        Entry::Symlink { path, meta, .. } => ("l", path, meta.mode),
                        Entry::Hardlink { path, .. } => ("h", path, 0),
                        Entry::Special { path, meta, .. } => ("s", path, meta.mode),
                        _ => continue,
                    };
                    if prefix.as_deref().is_some_and(|pre| !within(p, pre.as_bytes())) {
                        continue;
                    }
                    let sz = if kind == "-" { size } else { 0 };
                    if json {
                        // JSON escapes control characters itself.
                        let p = String::from_utf8_lossy(p);
                        println!("{}", serde_json::json!({"type": kind, "path": p, "mode": mode, "size": sz}));
                    } else {
                        // A crafted name must not reach the terminal raw.
                        println!("{kind} {mode:04o} {sz:>12} {}", escape_bytes(p));
                    }
                }
                Ok(())
            })
            .await
            .context("listing thread")??;
            Ok(())
        }
        Cmd::Forget { snapshot, name } => {
            let id = pick(&client, snapshot, name.as_deref()).await?;
            client.forget(id).await?;
            if cli.verbose {
                eprintln!("forgot snapshot {}", id.short());
            }
            Ok(())
        }
        Cmd::Protect { snapshot, name, remove } => {
            let id = pick(&client, snapshot, name.as_deref()).await?;
            client.protect(id, !remove).await?;
            Ok(())
        }
        Cmd::Restore { snapshot, name, target, stdout, include, exclude, verify_only } => {
            let id = pick(&client, snapshot, name.as_deref()).await?;
            let prog: Arc<dyn Progress> = if *stdout { Arc::new(Silent) } else { restore_progress() };
            let r = if *verify_only {
                verify(client, id, include.clone(), exclude.clone(), prog).await?
            } else {
                let target = if *stdout { None } else { target.clone() };
                let opts = RestoreOptions { target, include: include.clone(), exclude: exclude.clone() };
                restore(client, id, opts, prog).await?
            };
            for e in &r.errors {
                // They name paths from the snapshot.
                eprintln!("bkp: {}", escape(e));
            }
            for w in &r.warnings {
                eprintln!("bkp: warning: {}", escape(w));
            }
            let done = if *verify_only { "verified" } else { "restored" };
            if cli.json && *verify_only {
                println!("{}", serde_json::to_string(&r)?);
            } else if cli.json {
                // stdout may be carrying the restored stream.
                eprintln!("{}", serde_json::to_string(&r)?);
            } else if cli.verbose {
                eprintln!("{done} {} files, {}", r.files, indicatif::HumanBytes(r.bytes));
            }
            if !r.errors.is_empty() {
                let what = if *verify_only { "failed verification" } else { "were not restored" };
                anyhow::bail!("{} entries {what} (see above)", r.errors.len());
            }
            Ok(())
        }
        Cmd::Diff { from, to, name } => {
            let (a, b) = (pick(&client, from, name.as_deref()).await?, pick(&client, to, name.as_deref()).await?);
            browse::diff::print(&browse::diff::diff(client, a, b).await?, cli.json, cli.verbose)?;
            Ok(())
        }
        Cmd::Find { glob, host, name, since } => {
            let list = browse::find::since(client.snapshots(host.clone(), name.clone()).await?, since.as_deref())?;
            browse::find::print(&browse::find::find(client, glob, list).await?, cli.json, cli.verbose)?;
            Ok(())
        }
        Cmd::Cat { snapshot, path, name } => {
            let id = pick(&client, snapshot, name.as_deref()).await?;
            browse::cat::cat(client, id, path).await?;
            Ok(())
        }
        Cmd::Key { .. } => {
            anyhow::bail!("bkp key reached the connected commands; this is a bug in bkp, please report it")
        }
        Cmd::Mount { dir, host, name } => {
            let list = client.snapshots(host.clone(), name.clone()).await?;
            Ok(crate::mount::mount(client, dir.clone(), list).await?)
        }
    }
}

/// The clap definition, for generating man pages and shell completions
/// (xtask/).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_time() {
        assert_eq!(super::fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::fmt_time(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn ls_prefix() {
        use super::within;
        assert!(within(b"etc", b"etc") && within(b"etc/hosts", b"etc") && within(b"x", b""));
        assert!(!within(b"etcetera", b"etc") && !within(b"et", b"etc"));
    }
}
