//! What a push tells its caller: the skipped paths on stderr, the report
//! (`--json` or `--verbose`), and the exit code; and `bkp run`, which
//! pushes each selected definition between its hooks.

use std::path::PathBuf;
use std::sync::Arc;

use bkp_common::names::escape;
use bkp_common::snapshot::SnapshotKind;
use serde::Serialize;

use super::definition::{hook, select, DEFAULT_HOOK_TIMEOUT};
use crate::backup_def::BackupDef;
use crate::config::{self, ClientConfig, FileConfig};
use crate::conn::Client;
use crate::progress::Progress;
use crate::push::incremental::CacheSpec;
use crate::push::{push_with, PushOptions, PushReport, Skipped, Source};

/// A command's end other than success; [`Exit::code`] is its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Exit {
    /// Committed without the files that could not be read (listed above).
    #[error("{skipped} paths could not be read and are not in snapshot {id} (listed above)")]
    Incomplete { skipped: usize, id: String },
    /// `bkp run`: some definitions did not run clean (each said why above).
    #[error("{0}")]
    Run(String, u8),
}

impl Exit {
    pub fn code(&self) -> u8 {
        match self {
            Exit::Incomplete { .. } => 3,
            Exit::Run(_, code) => *code,
        }
    }
}

/// Prints what the user must see of a finished push: warnings, and every
/// path left out, on stderr.
fn print_problems(r: &PushReport) {
    for w in &r.warnings {
        eprintln!("bkp: warning: {}", escape(w));
    }
    for s in &r.skipped {
        eprintln!("bkp: cannot read {}: {}; left out of the snapshot", escape(&s.path), escape(&s.error));
    }
}

fn print_verbose(r: &PushReport) {
    let mbps = r.bytes_read as f64 / 1e6 / r.seconds.max(1e-9);
    eprintln!(
        "snapshot {} {}/{}: {} files ({} read, {} unchanged from cache), {}, {} sent ({} chunks of {}), {:.1} MB/s{}",
        r.snapshot.id.short(),
        r.snapshot.host,
        r.snapshot.name,
        r.snapshot.stats.files,
        r.files_read,
        r.files_cached,
        indicatif::HumanBytes(r.bytes_read),
        indicatif::HumanBytes(r.bytes_sent),
        r.chunks_sent,
        r.chunks,
        mbps,
        if r.skipped.is_empty() { String::new() } else { format!(", INCOMPLETE: {} skipped", r.skipped.len()) }
    );
}

/// `bkp push`'s end: the report, and [`Exit::Incomplete`] when files were
/// left out.
pub fn finish_push(r: &PushReport, json: bool, verbose: bool) -> anyhow::Result<()> {
    print_problems(r);
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else if verbose {
        print_verbose(r);
    }
    incomplete(r).map_or(Ok(()), |e| Err(e.into()))
}

fn incomplete(r: &PushReport) -> Option<Exit> {
    (!r.skipped.is_empty()).then(|| Exit::Incomplete { skipped: r.skipped.len(), id: r.snapshot.id.short() })
}

/// How one definition of `bkp run` ended (a `--json` line).
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    /// "ok", "incomplete" or "failed".
    pub result: &'static str,
    pub exit_code: u8,
    pub snapshot: Option<String>,
    pub skipped: Vec<Skipped>,
    pub error: Option<String>,
    pub report: Option<PushReport>,
}

impl Outcome {
    fn failed(name: &str, error: String) -> Self {
        Outcome {
            name: name.into(),
            result: "failed",
            exit_code: 1,
            snapshot: None,
            skipped: Vec::new(),
            error: Some(error),
            report: None,
        }
    }

    fn of(name: &str, r: PushReport) -> Self {
        let incomplete = !r.skipped.is_empty();
        Outcome {
            name: name.into(),
            result: if incomplete { "incomplete" } else { "ok" },
            exit_code: if incomplete { 3 } else { 0 },
            snapshot: Some(r.snapshot.id.to_hex()),
            skipped: r.skipped.clone(),
            error: None,
            report: Some(r),
        }
    }

    /// What the after hook is told.
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("BKP_NAME", self.name.clone()),
            ("BKP_RESULT", self.result.to_string()),
            ("BKP_EXIT_CODE", self.exit_code.to_string()),
            ("BKP_SKIPPED", self.skipped.len().to_string()),
        ];
        env.extend(self.snapshot.clone().map(|s| ("BKP_SNAPSHOT", s)));
        env.extend(self.error.clone().map(|e| ("BKP_ERROR", e)));
        env
    }
}

/// Worse of two exit codes: failed (1) over incomplete (3) over ok (0).
fn worse(a: u8, b: u8) -> u8 {
    let rank = |c: u8| match c {
        0 => 0,
        3 => 1,
        _ => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// What `bkp run` was given besides the definitions.
pub struct RunArgs {
    pub name: Option<String>,
    pub all: bool,
    pub no_cache: bool,
    pub flags: FileConfig,
    pub config: Option<PathBuf>,
    pub json: bool,
    pub verbose: bool,
}

/// `bkp run NAME` / `bkp run --all`.
pub async fn run(args: RunArgs, progress: impl Fn() -> Arc<dyn Progress>) -> anyhow::Result<()> {
    let file = config::load(args.config.as_deref())?;
    let defs = select(&file.backup, args.name.as_deref(), args.all).map_err(anyhow::Error::msg)?;
    let mut code = 0u8;
    let mut bad: Vec<String> = Vec::new();
    for def in defs {
        let out = run_one(def, &args, progress()).await;
        match (&out.error, &out.report) {
            (Some(e), _) => eprintln!("bkp: run {}: {}", escape(&def.name), escape(e)),
            (None, Some(r)) => {
                print_problems(r);
                if args.verbose && !args.json {
                    print_verbose(r);
                }
            }
            (None, None) => {}
        }
        if out.exit_code != 0 {
            bad.push(format!("{} {}", def.name, out.result));
        }
        code = worse(code, out.exit_code);
        if let Some(after) = &def.after {
            let env = out.env();
            let limit = def.hook_limit().unwrap_or(DEFAULT_HOOK_TIMEOUT);
            if let Err(e) = tokio::task::spawn_blocking({
                let after = after.clone();
                move || hook("after", &after, &env, limit)
            })
            .await?
            {
                eprintln!("bkp: warning: run {}: {e}", escape(&def.name));
            }
        }
        if args.json {
            println!("{}", serde_json::to_string(&out)?);
        }
    }
    match code {
        0 => Ok(()),
        c => Err(Exit::Run(format!("not every backup ran clean: {}", bad.join(", ")), c).into()),
    }
}

async fn run_one(def: &BackupDef, args: &RunArgs, progress: Arc<dyn Progress>) -> Outcome {
    let kind = if def.command.is_empty() { SnapshotKind::Tree } else { SnapshotKind::Stream };
    if let Some(before) = &def.before {
        let (script, env) = (before.clone(), vec![("BKP_NAME", def.name.clone())]);
        let limit = def.hook_limit().unwrap_or(DEFAULT_HOOK_TIMEOUT);
        let ran = tokio::task::spawn_blocking(move || hook("before", &script, &env, limit)).await;
        let failed = match ran {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(format!("before hook: {e}")),
        };
        if let Some(e) = failed {
            let e = format!("{e}; nothing was pushed");
            let note = tell_server(def, args, kind, &e).await;
            return Outcome::failed(&def.name, format!("{e}{note}"));
        }
    }
    let (cfg, cache_dir) = match ClientConfig::resolve_with_cache(args.flags.clone(), args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(&def.name, e.to_string()),
    };
    let client = match Client::connect(&cfg).await {
        Ok(c) => Arc::new(c),
        Err(e) => return Outcome::failed(&def.name, e.to_string()),
    };
    let source = if def.command.is_empty() {
        Source::Paths { paths: def.paths.clone(), excludes: def.exclude_spec() }
    } else {
        Source::Command(def.command.iter().map(Into::into).collect())
    };
    let ids = match crate::crypt::setup::push_ids() {
        Ok(ids) => ids,
        Err(e) => return Outcome::failed(&def.name, e),
    };
    let opts = PushOptions { name: def.name.clone(), source, zstd_level: def.level.unwrap_or(3), ids };
    let cache = cache_dir.map(|dir| CacheSpec { dir, read: !args.no_cache });
    let pushed = push_with(client.clone(), opts, cache, progress).await;
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    match pushed {
        Ok(r) => Outcome::of(&def.name, r),
        Err(e) => Outcome::failed(&def.name, e.to_string()),
    }
}

/// Reports a run that failed before its push to the server, as a failed
/// dump is, so it alerts now; returns a note when it could not.
async fn tell_server(def: &BackupDef, args: &RunArgs, kind: SnapshotKind, reason: &str) -> String {
    let told = async {
        let cfg = ClientConfig::resolve(args.flags.clone(), args.config.as_deref())?;
        let c = Client::connect(&cfg).await?;
        let r = c.push_failed(&def.name, Some(kind), reason).await;
        c.close().await;
        r.map_err(anyhow::Error::from)
    };
    match told.await {
        Ok(()) => String::new(),
        Err(e) => format!(" (the server was not told: {e:#})"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_worst_code_wins() {
        use super::worse;
        assert_eq!(worse(0, 3), 3);
        assert_eq!(worse(3, 1), 1);
        assert_eq!(worse(1, 3), 1);
        assert_eq!(worse(1, 0), 1);
        assert_eq!(worse(0, 0), 0);
    }
}
