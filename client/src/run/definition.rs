//! What a definition turns into: its push options, which definitions a
//! `bkp run` picks, and the hooks around it.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::push::ExcludeSpec;

use crate::backup_def::BackupDef;

impl BackupDef {
    /// Refuses a definition that could not run: checked for every
    /// definition before `--all` runs any.
    pub fn check(&self) -> Result<(), String> {
        bkp_common::names::check_set_name(&self.name).map_err(|e| format!("[[backup]] {:?}: {e}", self.name))?;
        let what = format!("[[backup]] {}", self.name);
        match (self.paths.is_empty(), self.command.is_empty()) {
            (true, true) => return Err(format!("{what}: give paths = [...] or command = [...]")),
            (false, false) => {
                return Err(format!("{what}: paths and command exclude each other; make two definitions"))
            }
            _ => {}
        }
        let tree_only = !self.excludes.is_empty()
            || !self.exclude_file.is_empty()
            || !self.exclude_if_present.is_empty()
            || self.exclude_caches
            || self.one_file_system
            || self.skip_nodump;
        if !self.command.is_empty() && tree_only {
            return Err(format!("{what}: exclude options and one_file_system apply to paths, not to a command"));
        }
        self.hook_limit()?;
        if let Some(l) = self.level {
            if !(-7..=19).contains(&l) {
                return Err(format!("{what}: level {l} is outside -7..=19"));
            }
        }
        Ok(())
    }

    /// What a tree push of this definition leaves out.
    pub fn exclude_spec(&self) -> ExcludeSpec {
        ExcludeSpec {
            patterns: self.excludes.clone(),
            files: self.exclude_file.clone(),
            if_present: self.exclude_if_present.clone(),
            caches: self.exclude_caches,
            one_file_system: self.one_file_system,
            skip_nodump: self.skip_nodump,
        }
    }
}

/// The definitions `bkp run NAME` / `bkp run --all` selects, all checked.
pub fn select<'a>(defs: &'a [BackupDef], name: Option<&str>, all: bool) -> Result<Vec<&'a BackupDef>, String> {
    for d in defs {
        d.check()?;
    }
    for (i, d) in defs.iter().enumerate() {
        if defs[..i].iter().any(|e| e.name == d.name) {
            return Err(format!("[[backup]] {} is defined twice", d.name));
        }
    }
    let known = || defs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
    match (name, all) {
        (Some(_), true) => Err("give NAME or --all, not both".into()),
        (None, false) => Err(format!("give a definition's NAME or --all (defined: {})", known())),
        (None, true) if defs.is_empty() => Err("no [[backup]] definitions in the client config".into()),
        (None, true) => Ok(defs.iter().collect()),
        (Some(n), false) => match defs.iter().find(|d| d.name == n) {
            Some(d) => Ok(vec![d]),
            None if defs.is_empty() => Err(format!("no [[backup]] named {n:?}: the client config has none")),
            None => Err(format!("no [[backup]] named {n:?} (defined: {})", known())),
        },
    }
}

/// A hook's time limit when the definition gives none.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);

impl BackupDef {
    /// `hook_timeout`, or the default.
    pub fn hook_limit(&self) -> Result<Duration, String> {
        match &self.hook_timeout {
            None => Ok(DEFAULT_HOOK_TIMEOUT),
            Some(t) => crate::config::parse_timeout(t).map_err(|e| format!("[[backup]] {}: hook_{e}", self.name)),
        }
    }
}

/// Runs a hook with `sh -c`; its output goes to stderr (stdout may be
/// carrying `--json`). A hook still running after `limit` is killed with
/// its whole process group (a shell's children too).
pub fn hook(which: &str, script: &str, env: &[(&str, String)], limit: Duration) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{which} hook could not run: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{which} hook failed ({s})")),
            Ok(None) if Instant::now() >= deadline => {
                // The group the hook leads (the crate forbids unsafe, so
                // kill(1) rather than kill(2)); the shell itself last, in
                // case kill(1) is missing.
                let group = format!("-{}", child.id());
                let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{which} hook ran longer than {} and was killed (raise hook_timeout if it needs longer)",
                    humantime::format_duration(limit)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{which} hook: waiting for it: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use serde::Deserialize;

    fn defs(text: &str) -> Vec<BackupDef> {
        #[derive(Deserialize)]
        struct F {
            backup: Vec<BackupDef>,
        }
        toml::from_str::<F>(text).unwrap().backup
    }

    #[test]
    fn definitions_are_checked_and_selected() {
        let d = defs(
            r#"
            [[backup]]
            name = "system"
            paths = ["/etc"]
            exclude_file = "/etc/bkp/excludes"
            exclude_if_present = [".nobackup", ".nobkp"]
            [[backup]]
            name = "pg"
            command = ["pg_dump", "shop"]
            before = "true"
            "#,
        );
        assert_eq!(d[0].exclude_file, [PathBuf::from("/etc/bkp/excludes")]);
        assert_eq!(d[0].exclude_if_present.len(), 2);
        assert_eq!(select(&d, Some("pg"), false).unwrap()[0].command, ["pg_dump", "shop"]);
        assert_eq!(select(&d, None, true).unwrap().len(), 2);
        assert!(select(&d, Some("nope"), false).unwrap_err().contains("system, pg"));
        assert!(select(&d, None, false).is_err() && select(&d, Some("pg"), true).is_err());
        let both = defs("[[backup]]\nname = \"x\"\npaths = [\"/a\"]\ncommand = [\"c\"]\n");
        assert!(select(&both, None, true).unwrap_err().contains("exclude each other"));
        let neither = defs("[[backup]]\nname = \"x\"\n");
        assert!(select(&neither, Some("x"), false).is_err());
        let bad = defs("[[backup]]\nname = \"a/b\"\npaths = [\"/a\"]\n");
        assert!(select(&bad, None, true).is_err());
        let twice = defs("[[backup]]\nname = \"a\"\npaths = [\"/a\"]\n[[backup]]\nname = \"a\"\npaths = [\"/b\"]\n");
        assert!(select(&twice, None, true).unwrap_err().contains("twice"));
        let dump_excl = defs("[[backup]]\nname = \"a\"\ncommand = [\"c\"]\none_file_system = true\n");
        assert!(select(&dump_excl, None, true).is_err());
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct F {
            backup: Vec<BackupDef>,
        }
        assert!(toml::from_str::<F>("[[backup]]\nname = \"a\"\npath = [\"/a\"]\n").is_err(), "unknown key");
    }

    #[test]
    fn hooks_get_their_environment_and_fail_loudly() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("env");
        let script = format!("echo \"$BKP_RESULT $BKP_NAME\" > {}", out.display());
        let limit = DEFAULT_HOOK_TIMEOUT;
        hook("after", &script, &[("BKP_RESULT", "ok".into()), ("BKP_NAME", "n".into())], limit).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "ok n\n");
        assert!(hook("before", "exit 4", &[], limit).unwrap_err().contains("exit status: 4"));
    }

    #[test]
    fn a_hook_past_its_limit_is_killed_with_its_children() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        // The shell's child sleeps; killing only the shell would leave it.
        let script = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let e = hook("before", &script, &[], Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The group was sent SIGKILL; the orphan is reaped by init, so poll.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
        {
            assert!(Instant::now() < deadline, "the hook's child {pid} outlived the kill");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_bad_hook_timeout_is_refused() {
        let d = BackupDef {
            name: "n".into(),
            paths: vec!["/a".into()],
            hook_timeout: Some("soon".into()),
            ..Default::default()
        };
        assert!(d.check().unwrap_err().contains("hook_timeout"));
    }
}
