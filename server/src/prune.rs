//! Prune: apply each backup set's retention policy. Plan first
//! ([`prune_plan`], a pure read), then act ([`prune`]).

use std::collections::BTreeMap;

use bkp_common::snapshot::SnapshotSummary;
use serde::{Deserialize, Serialize};

pub use crate::report::{PruneReport, SetPlan};
use crate::retention::{plan, Candidate, Policy, Reason};
use crate::store::{MetaStore, StoreError};

/// `[retention]` in the server config: a default policy and overrides
/// keyed by `"host/name"`.
#[derive(Clone, Debug, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub default: Policy,
    pub sets: BTreeMap<String, Policy>,
}

impl RetentionConfig {
    pub fn policy(&self, host: &str, name: &str) -> &Policy {
        self.sets.get(&format!("{host}/{name}")).unwrap_or(&self.default)
    }
}

pub fn prune_plan(store: &dyn MetaStore, cfg: &RetentionConfig, now_ns: u64) -> Result<Vec<SetPlan>, StoreError> {
    let mut sets: BTreeMap<(String, String), Vec<SnapshotSummary>> = BTreeMap::new();
    for s in store.list_snapshots(None, None)? {
        sets.entry((s.host.clone(), s.name.clone())).or_default().push(s);
    }
    Ok(sets
        .into_iter()
        .map(|((host, name), snaps)| {
            let policy = cfg.policy(&host, &name).clone();
            let cands: Vec<Candidate> =
                snaps.iter().map(|s| Candidate { id: s.id, time_ns: s.time_ns, protected: s.protected }).collect();
            let verdicts = plan(&cands, &policy, now_ns);
            SetPlan { host, name, policy, verdicts }
        })
        .collect())
}

/// Deletes what the plan removes. Chunks are freed by the next GC.
pub fn prune(store: &dyn MetaStore, mut plan: Vec<SetPlan>, dry_run: bool) -> Result<PruneReport, StoreError> {
    let mut r = PruneReport { sets: plan.len() as u64, ..Default::default() };
    for set in &mut plan {
        for v in &mut set.verdicts {
            if v.kept() {
                r.kept += 1;
                continue;
            }
            if !dry_run {
                match store.delete_snapshot(&v.id) {
                    // Protected since the plan was made: the store refused.
                    Err(StoreError::Protected(_)) => {
                        v.keep.push(Reason::Protected);
                        r.kept += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                    Ok(_) => {}
                }
            }
            r.removed += 1;
        }
    }
    r.plan = plan;
    Ok(r)
}
