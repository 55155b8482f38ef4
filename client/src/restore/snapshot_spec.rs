//! Turning what a user typed (`latest`, an id prefix, a full id) into a
//! snapshot id.

use bkp_common::snapshot::SnapshotSummary;
use bkp_common::SnapshotId;

use crate::error::{ClientError, Result};

/// Picks a snapshot from a listing (already filtered by `--name`).
pub fn resolve(spec: &str, name: Option<&str>, list: &[SnapshotSummary]) -> Result<SnapshotId> {
    if spec == "latest" {
        if name.is_none() && list.iter().any(|s| s.name != list[0].name) {
            return Err(ClientError::Usage("`latest` needs --name when a host has several backup sets".into()));
        }
        // An admin token sees every host: never pick another host's backup
        // by accident.
        if list.iter().any(|s| s.host != list[0].host) {
            return Err(ClientError::Usage("`latest` matches several hosts; give a snapshot id".into()));
        }
        return list
            .iter()
            .max_by_key(|s| s.time_ns)
            .map(|s| s.id)
            .ok_or_else(|| ClientError::Usage("no snapshots yet".into()));
    }
    if spec.len() < 4 || !spec.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ClientError::Usage(format!(
            "{spec:?} is not a snapshot: give `latest`, or at least 4 hex digits of an id from `bkp snapshots`"
        )));
    }
    let hits: Vec<_> = list.iter().filter(|s| s.id.matches_prefix(spec)).collect();
    match hits.as_slice() {
        [one] => Ok(one.id),
        [] => Err(ClientError::Usage(format!("no snapshot matches {spec}"))),
        many => Err(ClientError::Usage(format!("{spec} is ambiguous ({} snapshots); type more digits", many.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkp_common::snapshot::{SnapshotKind, SnapshotStats};

    fn s(byte: u8, name: &str, t: u64) -> SnapshotSummary {
        SnapshotSummary {
            id: SnapshotId::from_bytes([byte; 32]),
            host: "h".into(),
            name: name.into(),
            time_ns: t,
            kind: SnapshotKind::Tree,
            stats: SnapshotStats::default(),
            protected: false,
            incomplete: None,
        }
    }

    #[test]
    fn resolves() {
        let l = vec![s(0xab, "db", 1), s(0xac, "db", 3), s(0xcd, "db", 2)];
        assert_eq!(resolve("latest", Some("db"), &l).unwrap(), l[1].id);
        assert_eq!(resolve("abab", None, &l).unwrap(), l[0].id);
        assert!(resolve("aaaa", None, &l).is_err());
        assert!(resolve("xyz!", None, &l).is_err());
        let l2 = vec![s(0xab, "db", 1), s(0xab, "files", 2)];
        assert!(resolve("abab", None, &l2).is_err());
        assert!(resolve("latest", None, &l2).is_err());
        assert!(resolve("latest", None, &[]).is_err());
        let mut other = s(0xee, "db", 9);
        other.host = "h2".into();
        assert!(resolve("latest", Some("db"), &[s(0xab, "db", 1), other]).is_err());
    }
}
