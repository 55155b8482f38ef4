//! `bkp key`: make, protect, print and check a key group's key file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Subcommand;

use super::keyfile::{self, Costs, KeyFile};
use super::setup::{self, default_key_file};
use super::{paper, Keyring};

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Make a new key group's key file (mode 0600). Losing it loses the
    /// data it seals: print the recovery form (`bkp key export --paper`).
    Init {
        #[arg(long)]
        group: String,
        /// Where (default ~/.config/bkp/keys/GROUP.key).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Protect the key with a passphrase (BKP_KEY_NEW_PASSPHRASE, or
        /// asked). Without it the file is the key, as cron needs.
        #[arg(long)]
        passphrase: bool,
    },
    /// Protect a key file with a (new) passphrase, argon2id.
    AddPassphrase {
        #[command(flatten)]
        which: Which,
    },
    /// Print the key as a recovery form, to keep on paper.
    Export {
        #[command(flatten)]
        which: Which,
        /// The printable form (the only export there is).
        #[arg(long, required = true)]
        paper: bool,
    },
    /// Write a key file from a recovery form read on standard input.
    Import {
        /// Where (default ~/.config/bkp/keys/GROUP.key of the form's group).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Check that the key file opens; with a server configured, that it
    /// opens every chunk of this host's newest snapshot (of --name).
    Check {
        #[command(flatten)]
        which: Which,
        /// The backup set whose newest snapshot to open.
        #[arg(long)]
        name: Option<String>,
        /// Only check the file itself, without the server.
        #[arg(long)]
        offline: bool,
    },
}

/// Which key file: `--file`, else `--group`'s default, else client.toml's.
#[derive(clap::Args)]
pub struct Which {
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long)]
    group: Option<String>,
}

impl Which {
    fn path(&self, config: Option<&Path>) -> anyhow::Result<PathBuf> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        if let Some(g) = &self.group {
            return Ok(default_key_file(g));
        }
        match setup::setting(config)? {
            Some(s) => Ok(s.key_file),
            None => anyhow::bail!("which key file? give --file or --group, or set key_file in client.toml"),
        }
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn unlock(path: &Path) -> anyhow::Result<(KeyFile, Vec<[u8; 32]>)> {
    let f = keyfile::read(path)?;
    let pass = if f.needs_passphrase() { setup::passphrase(&f.group).map_err(anyhow::Error::msg)? } else { None };
    let keys = f.unlock(pass.as_deref())?;
    Ok((f, keys))
}

fn ids(keys: &[[u8; 32]]) -> String {
    keys.iter().map(|k| super::Keys::derive(k).key_id()).collect::<Vec<_>>().join(", ")
}

/// Runs a `bkp key` command; `conn` connects for `check`.
pub async fn run<F, Fut>(cmd: &KeyCmd, config: Option<&Path>, conn: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Arc<crate::Client>>>,
{
    match cmd {
        KeyCmd::Init { group, file, passphrase } => {
            bkp_common::names::check_set_name(group).map_err(|e| anyhow::anyhow!("--group: {e}"))?;
            let path = file.clone().unwrap_or_else(|| default_key_file(group));
            let keys = vec![keyfile::new_master()];
            let mut f = KeyFile::raw(group, keys.clone(), now_ns());
            if *passphrase {
                f = f.protect(&keys, &setup::new_passphrase().map_err(anyhow::Error::msg)?, Costs::DEFAULT)?;
            }
            keyfile::write(&path, &f, false)?;
            println!(
                "key group {group}: key {} written to {}; losing this key loses the data it seals (print a copy: \
                 bkp key export --paper --file {})",
                ids(&keys),
                path.display(),
                path.display()
            );
            Ok(())
        }
        KeyCmd::AddPassphrase { which } => {
            let path = which.path(config)?;
            let (f, keys) = unlock(&path)?;
            let protected = f.protect(&keys, &setup::new_passphrase().map_err(anyhow::Error::msg)?, Costs::DEFAULT)?;
            keyfile::write(&path, &protected, true)?;
            println!("key file {} of group {} is now protected by the passphrase", path.display(), f.group);
            Ok(())
        }
        KeyCmd::Export { which, .. } => {
            let (f, keys) = unlock(&which.path(config)?)?;
            print!("{}", paper::form(&f.group, &keys));
            Ok(())
        }
        KeyCmd::Import { file } => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            let (group, keys) = paper::parse(&text).map_err(anyhow::Error::msg)?;
            bkp_common::names::check_set_name(&group).map_err(|e| anyhow::anyhow!("the form's group: {e}"))?;
            let path = file.clone().unwrap_or_else(|| default_key_file(&group));
            keyfile::write(&path, &KeyFile::raw(&group, keys.clone(), now_ns()), false)?;
            println!("key group {group}: key {} written to {}", ids(&keys), path.display());
            Ok(())
        }
        KeyCmd::Check { which, name, offline } => {
            let path = which.path(config)?;
            let (f, keys) = unlock(&path)?;
            let how = if f.needs_passphrase() { "passphrase" } else { "raw, no passphrase" };
            println!("key file {}: group {}, key {} ({how})", path.display(), f.group, ids(&keys));
            if *offline {
                return Ok(());
            }
            let ring = Arc::new(Keyring::new(f.group.clone(), &keys));
            check_newest(conn().await?, ring, name.as_deref()).await
        }
    }
}

/// Opens every chunk of the host's newest snapshot (of set `name`) with
/// `ring`, as `restore --verify-only` does.
async fn check_newest(client: Arc<crate::Client>, ring: Arc<Keyring>, name: Option<&str>) -> anyhow::Result<()> {
    let list = client.snapshots(None, name.map(str::to_string)).await?;
    let Some(newest) = list.iter().max_by_key(|s| s.time_ns) else {
        println!("no snapshot of this host yet: nothing to open");
        return Ok(());
    };
    super::use_keyring(ring);
    let before = super::sealed_opened();
    let r = crate::restore::verify(client, newest.id, vec![], vec![], Arc::new(crate::progress::Silent)).await?;
    let opened = super::sealed_opened() - before;
    if !r.errors.is_empty() {
        anyhow::bail!("snapshot {} ({}) does not check out: {}", newest.id.short(), newest.name, r.errors.join("; "));
    }
    if opened == 0 {
        println!(
            "snapshot {} ({}) holds no sealed chunk: it was pushed without encryption",
            newest.id.short(),
            newest.name
        );
    } else {
        println!(
            "the key opens snapshot {} ({}): {opened} sealed chunks, {} files checked",
            newest.id.short(),
            newest.name,
            r.files
        );
    }
    Ok(())
}
