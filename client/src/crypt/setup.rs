//! Where a command finds its key: `encryption` and `key_file` in
//! client.toml, and the passphrase of a protected key file.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::keyfile;
use super::{ChunkIds, Keyring};

/// What client.toml says about encryption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The group whose key seals pushes; `None`: pushes are plain (a key
    /// file alone still lets restores read sealed snapshots).
    pub group: Option<String>,
    pub key_file: PathBuf,
}

/// `~/.config/bkp/keys/GROUP.key` (under `$XDG_CONFIG_HOME` when set).
pub fn default_key_file(group: &str) -> PathBuf {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"));
    base.join("bkp/keys").join(format!("{group}.key"))
}

/// The setting of the config file (see `config::load`); `None`: neither
/// key is set.
pub fn setting(config_file: Option<&Path>) -> Result<Option<Setting>, crate::config::ConfigError> {
    let f = crate::config::load(config_file)?;
    Ok(match (f.encryption, f.key_file) {
        (None, None) => None,
        (group, Some(key_file)) => Some(Setting { group, key_file }),
        (Some(g), None) => Some(Setting { key_file: default_key_file(&g), group: Some(g) }),
    })
}

/// The passphrase of an existing key file: `BKP_KEY_PASSPHRASE`, else the
/// first line of `BKP_KEY_PASSPHRASE_FILE`, else asked on the terminal.
pub fn passphrase(group: &str) -> Result<Option<String>, String> {
    if let Ok(p) = std::env::var("BKP_KEY_PASSPHRASE") {
        return Ok(Some(p));
    }
    if let Ok(f) = std::env::var("BKP_KEY_PASSPHRASE_FILE") {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("BKP_KEY_PASSPHRASE_FILE {f}: {e}"))?;
        return Ok(Some(text.lines().next().unwrap_or("").to_string()));
    }
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    ask(&format!("passphrase of key group {group}: ")).map(Some)
}

/// A new passphrase: `BKP_KEY_NEW_PASSPHRASE`, else asked twice.
pub fn new_passphrase() -> Result<String, String> {
    if let Ok(p) = std::env::var("BKP_KEY_NEW_PASSPHRASE") {
        return check_new(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err("no terminal to ask a new passphrase on: set BKP_KEY_NEW_PASSPHRASE".into());
    }
    let a = ask("new passphrase: ")?;
    if ask("again: ")? != a {
        return Err("the two passphrases differ; nothing was changed".into());
    }
    check_new(a)
}

fn check_new(p: String) -> Result<String, String> {
    if p.chars().count() < 8 {
        return Err("a passphrase needs at least 8 characters".into());
    }
    Ok(p)
}

/// Asks on the terminal with echo off (`stty`, so no unsafe termios here).
fn ask(prompt: &str) -> Result<String, String> {
    let stty = |arg: &str| {
        let tty = std::fs::File::open("/dev/tty").ok()?;
        std::process::Command::new("stty").arg(arg).stdin(tty).status().ok()
    };
    eprint!("{prompt}");
    stty("-echo");
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    stty("echo");
    eprintln!();
    read.map_err(|e| format!("reading the passphrase: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Reads and unlocks a key file; `group`: the group it must be.
pub fn load_keyring(path: &Path, group: Option<&str>) -> Result<Keyring, String> {
    let f = keyfile::read(path).map_err(|e| format!("{e} (key_file in client.toml)"))?;
    if let Some(g) = group.filter(|g| *g != f.group) {
        return Err(format!(
            "key file {} is of key group {:?}, not {g:?} (`encryption` in client.toml)",
            path.display(),
            f.group
        ));
    }
    let pass = if f.needs_passphrase() { passphrase(&f.group)? } else { None };
    let keys = f.unlock(pass.as_deref()).map_err(|e| e.to_string())?;
    Ok(Keyring::new(f.group, &keys))
}

static SETTING: OnceLock<Option<Setting>> = OnceLock::new();

/// Installs the process's setting: reads open sealed chunks with its key
/// (loaded at the first one), pushes seal with it when it names a group.
pub fn install(s: Option<Setting>) {
    if let Some(s) = s.clone() {
        super::install_loader(move || load_keyring(&s.key_file, s.group.as_deref()));
    }
    let _ = SETTING.set(s);
}

/// How this process's pushes name their chunks (see [`install`]).
pub fn push_ids() -> Result<ChunkIds, String> {
    match SETTING.get() {
        Some(Some(Setting { group: Some(_), .. })) => match super::keyring() {
            Some(Ok(ring)) => Ok(ChunkIds::Sealed(ring)),
            Some(Err(e)) => Err(e),
            None => Err("no key loader installed; this is a bug in bkp".into()),
        },
        _ => Ok(ChunkIds::Plain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_from_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("client.toml");
        std::fs::write(&cfg, "encryption = \"db\"\nkey_file = \"/k/db.key\"\n").unwrap();
        let s = setting(Some(&cfg)).unwrap().unwrap();
        assert_eq!(s, Setting { group: Some("db".into()), key_file: "/k/db.key".into() });
        std::fs::write(&cfg, "encryption = \"db\"\n").unwrap();
        assert!(setting(Some(&cfg)).unwrap().unwrap().key_file.ends_with("bkp/keys/db.key"));
        std::fs::write(&cfg, "server = \"x:1\"\n").unwrap();
        assert_eq!(setting(Some(&cfg)).unwrap(), None);
    }

    #[test]
    fn a_key_of_another_group_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.key");
        keyfile::write(&p, &keyfile::KeyFile::raw("a", vec![[1; 32]], 0), false).unwrap();
        assert_eq!(load_keyring(&p, Some("a")).unwrap().group, "a");
        let e = load_keyring(&p, Some("b")).err().unwrap();
        assert!(e.contains("\"a\"") && e.contains("\"b\""), "{e}");
        let e = load_keyring(&dir.path().join("none.key"), Some("a")).err().unwrap();
        assert!(e.contains("none.key"), "{e}");
    }
}
