//! One `[[backup]]` table of client.toml, as read. A module of its own,
//! below both `config` (which reads the file) and `run` (which carries a
//! definition out), so that neither imports the other.

use std::path::PathBuf;

use serde::Deserialize;

/// One `[[backup]]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupDef {
    /// The backup set's name (`bkp run NAME`, `--name` of the push).
    pub name: String,
    /// File trees to back up...
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// ...or a command whose standard output is the backup (no shell:
    /// the program and its arguments).
    #[serde(default)]
    pub command: Vec<String>,
    /// As `--exclude`: a glob without `/` matches a name anywhere, one
    /// with `/` the absolute path.
    #[serde(default)]
    pub excludes: Vec<String>,
    /// As `--exclude-file`: one file, or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub exclude_file: Vec<PathBuf>,
    /// As `--exclude-if-present`: one name, or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub exclude_if_present: Vec<String>,
    #[serde(default)]
    pub exclude_caches: bool,
    #[serde(default)]
    pub one_file_system: bool,
    #[serde(default)]
    pub skip_nodump: bool,
    /// Shell command (`/bin/sh -c`) run first; when it fails, nothing is
    /// pushed and the run fails.
    pub before: Option<String>,
    /// Shell command run last, whatever happened, with `BKP_RESULT`
    /// (ok, incomplete, failed), `BKP_EXIT_CODE`, `BKP_NAME`,
    /// `BKP_SNAPSHOT` (when one was committed), `BKP_SKIPPED` and
    /// `BKP_ERROR` (when it failed).
    pub after: Option<String>,
    /// zstd level of new chunks (default 3).
    pub level: Option<i32>,
    /// How long each hook may run before it and its children are killed
    /// and the hook counts as failed, e.g. "10m" (default 1h): a hook
    /// stuck on a lock must not hold every later night's run.
    pub hook_timeout: Option<String>,
}

fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(v) => v,
    })
}
