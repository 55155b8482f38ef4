//! `/metrics`: the Prometheus (OpenMetrics text) rendering of a
//! [`Status`] and the server's counters. Built fresh for each scrape from
//! the store, so there is no second copy of the truth to keep in step.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::monitor::{Counters, Status};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type G = Gauge<f64, AtomicU64>;
type Labels = Vec<(String, String)>;

struct Reg(Registry);

impl Reg {
    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        let g = G::default();
        g.set(v);
        self.0.register(name, help, g);
    }

    fn family(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, f64)>) {
        let f = Family::<Labels, G>::default();
        for (l, v) in rows {
            f.get_or_create(&l).set(v);
        }
        self.0.register(name, help, f);
    }

    /// Registered without `_info`: the encoder appends it. Rendered as
    /// `NAME_info{...} 1`.
    fn info(&mut self, name: &str, help: &str, labels: Labels) {
        self.0.register(name, help, prometheus_client::metrics::info::Info::new(labels));
    }

    /// Registered without `_total`: the encoder appends it.
    fn counter(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in rows {
            f.get_or_create(&l).inc_by(v);
        }
        self.0.register(name, help, f);
    }
}

/// prometheus_client writes label values as given: `\`, `"` and newlines
/// are escaped here, as the exposition format wants. (Host and set names
/// cannot hold them today; this keeps a future name from breaking the
/// scrape.)
fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), escape_label(v))).collect()
}

fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// `audit_dropped`: audit lines lost since start, (queue full, rate limit).
pub fn render(st: &Status, c: &Counters, firing: u64, audit_dropped: (u64, u64)) -> String {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut r = Reg(Registry::default());
    r.gauge("bkp_up", "1 while the server answers", 1.0);
    r.info("bkp_build", "the server's version", l(&[("version", bkp_common::VERSION)]));
    let per_set: Vec<_> = c.per_set.lock().expect("per-set counters").clone().into_iter().collect();
    r.counter(
        "bkp_pushes",
        "push commits since start, per set (name \"\": the session had expired)",
        per_set.iter().flat_map(|((host, name), (ok, failed))| {
            [
                (l(&[("host", host), ("name", name), ("result", "ok")]), *ok),
                (l(&[("host", host), ("name", name), ("result", "failed")]), *failed),
            ]
        }),
    );
    r.counter("bkp_push_read_bytes", "logical bytes of committed snapshots", [(vec![], get(&c.read_bytes))]);
    r.counter("bkp_push_uploaded_bytes", "compressed chunk bytes received", [(vec![], get(&c.uploaded_bytes))]);
    r.counter("bkp_push_new_bytes", "compressed bytes new to the store", [(vec![], get(&c.new_bytes))]);
    r.counter(
        "bkp_alert_notifications",
        "alert notifications delivered",
        [
            (l(&[("status", "firing")]), get(&c.notified_firing)),
            (l(&[("status", "resolved")]), get(&c.notified_resolved)),
        ],
    );
    r.counter("bkp_alert_delivery_failures", "alert deliveries that failed", [(vec![], get(&c.delivery_failures))]);
    r.counter(
        "bkp_audit_dropped",
        "audit lines not written: the writer's queue was full, or refusals over [audit] refusals_per_second",
        [(l(&[("reason", "queue_full")]), audit_dropped.0), (l(&[("reason", "rate_limit")]), audit_dropped.1)],
    );

    if let Some(b) = st.backend {
        r.counter("bkp_s3_puts", "object store PUT attempts", [(vec![], b.puts)]);
        r.counter("bkp_s3_gets", "object store GET attempts", [(vec![], b.gets)]);
        r.counter("bkp_s3_errors", "object store attempts that failed (retried or not)", [(vec![], b.errors)]);
        r.counter("bkp_s3_retries", "object store attempts retried", [(vec![], b.retries)]);
        r.counter("bkp_s3_put_bytes", "bytes written to the object store", [(vec![], b.bytes_put)]);
        r.counter("bkp_s3_get_bytes", "bytes read from the object store", [(vec![], b.bytes_got)]);
        r.gauge("bkp_s3_upload_queue_bytes", "sealed packs waiting for their upload", b.upload_queue_bytes as f64);
        r.gauge("bkp_s3_packs", "pack objects recorded as stored", b.packs as f64);
        r.gauge("bkp_s3_pack_bytes", "bytes of the pack objects recorded as stored", b.pack_bytes as f64);
        r.gauge(
            "bkp_s3_unreachable_seconds",
            "how long the object store has not answered (0: it answers)",
            b.unreachable_secs.unwrap_or(0) as f64,
        );
    }
    let s = st.stats;
    r.gauge("bkp_store_chunks", "chunks stored", s.chunks as f64);
    r.gauge("bkp_store_chunk_raw_bytes", "uncompressed size of stored chunks", s.raw_bytes as f64);
    r.gauge("bkp_store_chunk_stored_bytes", "compressed size of stored chunks", s.stored_bytes as f64);
    r.gauge("bkp_store_logical_bytes", "sum of the sizes of all snapshots", st.logical_bytes as f64);
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    r.gauge("bkp_dedup_ratio", "logical bytes / stored raw bytes", ratio(st.logical_bytes, s.raw_bytes));
    r.gauge("bkp_compression_ratio", "raw bytes / compressed bytes", ratio(s.raw_bytes, s.stored_bytes));
    r.gauge("bkp_store_disk_bytes", "database size on disk", st.store_disk_bytes as f64);
    if let Some(d) = st.disk {
        r.gauge("bkp_disk_free_bytes", "free space on the data directory's filesystem", d.free as f64);
        r.gauge("bkp_disk_total_bytes", "size of the data directory's filesystem", d.total as f64);
    }

    let set = |x: &crate::freshness::SetStatus| l(&[("host", &x.host), ("name", &x.name)]);
    r.family("bkp_snapshots", "snapshots kept per set", st.sets.iter().map(|x| (set(x), x.snapshots as f64)));
    r.family(
        "bkp_last_backup_timestamp_seconds",
        "time of the newest snapshot of the set",
        st.sets.iter().map(|x| (set(x), secs(x.last_ns))),
    );
    r.family(
        "bkp_last_backup_bytes",
        "size of the newest snapshot",
        st.sets.iter().map(|x| (set(x), x.last_bytes as f64)),
    );
    r.family(
        "bkp_snapshot_incomplete",
        "1 when the newest snapshot of the set left out files its push could not read",
        st.sets.iter().map(|x| (set(x), if x.last_skipped > 0 { 1.0 } else { 0.0 })),
    );
    r.family(
        "bkp_snapshot_skipped_files",
        "files the push of the newest snapshot could not read",
        st.sets.iter().map(|x| (set(x), x.last_skipped as f64)),
    );
    r.family(
        "bkp_backup_expected_interval_seconds",
        "configured or learned backup interval",
        st.sets.iter().filter_map(|x| Some((set(x), x.expected?.as_secs_f64()))),
    );
    r.family(
        "bkp_backup_stale",
        "1 when the newest snapshot is older than interval plus grace",
        st.sets.iter().map(|x| (set(x), if x.stale { 1.0 } else { 0.0 })),
    );

    let pf = |p: &crate::monitor::PushFailing| l(&[("host", &p.failure.host), ("name", &p.failure.name)]);
    r.counter(
        "bkp_push_failures",
        "failed pushes the clients reported (dump command, read or connection errors)",
        st.push_failures.iter().map(|p| (pf(p), p.failure.count)),
    );
    r.family(
        "bkp_push_last_failure_timestamp_seconds",
        "time of the newest reported push failure of the set",
        st.push_failures.iter().map(|p| (pf(p), secs(p.failure.last_ns))),
    );
    r.family(
        "bkp_push_failing",
        "1 while the newest push failure of the set is newer than its newest snapshot",
        st.push_failures.iter().map(|p| (pf(p), if p.failing { 1.0 } else { 0.0 })),
    );

    r.gauge("bkp_verify_coverage_ratio", "share of chunks scrubbed in the current cycle", st.scrub.coverage());
    r.gauge("bkp_verify_last_cycle_timestamp_seconds", "end of the last full scrub", secs(st.scrub.last_cycle_end_ns));
    r.gauge("bkp_verify_last_run_timestamp_seconds", "last scrub run", secs(st.scrub.last_run_ns));
    let last_verify = st.jobs.get("verify").and_then(|(_, ok)| ok.as_ref()).and_then(|j| j.verify_report());
    let scrubbed = last_verify.and_then(|v| v.scrub.as_ref()).map_or(0, |s| s.chunks_checked);
    r.gauge("bkp_verify_chunks_checked", "chunks scrubbed by the last verify run", scrubbed as f64);
    let files = last_verify.map_or(0, |v| v.files_checked);
    r.gauge("bkp_verify_files_checked", "files rebuilt by the last restore drill", files as f64);
    r.gauge("bkp_quarantined_chunks", "chunks in quarantine, not healed", st.quarantined as f64);
    r.gauge("bkp_damaged_snapshots", "snapshots that failed verification", st.damaged.len() as f64);

    let last_gc = st.jobs.get("gc").and_then(|(_, ok)| ok.as_ref()).and_then(|j| j.gc_report());
    let gc = |f: fn(&crate::report::GcReport) -> u64| last_gc.map_or(0, f) as f64;
    r.gauge(
        "bkp_gc_last_bytes_rewritten",
        "bytes the last successful GC wrote to reclaim space (compactions, relocated chunks)",
        gc(|g| g.bytes_rewritten + g.pack_bytes_rewritten),
    );
    r.gauge("bkp_gc_last_bytes_relocated", "live chunk bytes the last successful GC moved", gc(|g| g.bytes_relocated));
    r.gauge("bkp_gc_last_bytes_freed", "disk bytes the last successful GC freed", gc(|g| g.bytes_freed));
    r.gauge("bkp_gc_last_disk_bytes", "store bytes on disk after the last successful GC", gc(|g| g.disk_bytes_after));

    let kind = |k: &str| l(&[("kind", k)]);
    let jobs = || st.jobs.iter();
    r.family(
        "bkp_job_last_run_timestamp_seconds",
        "start of the latest run",
        jobs().map(|(k, (j, _))| (kind(k), secs(j.start_ns))),
    );
    r.family(
        "bkp_job_last_duration_seconds",
        "duration of the latest run",
        jobs().map(|(k, (j, _))| (kind(k), secs(j.end_ns.saturating_sub(j.start_ns)))),
    );
    r.family(
        "bkp_job_last_success",
        "1 when the latest run succeeded",
        jobs().map(|(k, (j, _))| (kind(k), j.ok as u8 as f64)),
    );
    r.family(
        "bkp_job_last_success_timestamp_seconds",
        "end of the latest successful run",
        jobs().filter_map(|(k, (_, ok))| Some((kind(k), secs(ok.as_ref()?.end_ns)))),
    );
    r.family(
        "bkp_job_scheduled",
        "1 for each job kind with a schedule in [jobs]",
        st.scheduled.iter().map(|k| (kind(k), 1.0)),
    );
    let remote = |j: &crate::monitor::SyncStatus| l(&[("remote", &j.name)]);
    r.family(
        "bkp_sync_last_run_timestamp_seconds",
        "start of the sync job's latest run",
        st.sync.iter().filter(|j| j.state.last_run_ns > 0).map(|j| (remote(j), secs(j.state.last_run_ns))),
    );
    r.family(
        "bkp_sync_last_success_timestamp_seconds",
        "start of the sync job's latest run that copied everything",
        st.sync.iter().filter(|j| j.state.last_ok_ns > 0).map(|j| (remote(j), secs(j.state.last_ok_ns))),
    );
    r.family(
        "bkp_sync_lag_seconds",
        "how far the set's newest copy here is behind the primary's newest, at the last sync",
        st.sync.iter().flat_map(|j| {
            j.state.sets.iter().map(move |(set, lag)| {
                let (host, name) = set.split_once('/').unwrap_or((set, ""));
                (l(&[("remote", &j.name), ("host", host), ("name", name)]), secs(lag.lag_ns()))
            })
        }),
    );
    r.counter(
        "bkp_sync_transferred_bytes",
        "chunk bytes the sync job fetched from its remote",
        st.sync.iter().map(|j| (remote(j), j.state.bytes_total)),
    );
    r.counter(
        "bkp_sync_transferred_chunks",
        "chunks the sync job fetched from its remote",
        st.sync.iter().map(|j| (remote(j), j.state.chunks_total)),
    );
    r.counter(
        "bkp_sync_snapshots_copied",
        "snapshots the sync job copied",
        st.sync.iter().map(|j| (remote(j), j.state.snapshots_total)),
    );
    r.gauge("bkp_sessions_live", "push sessions in progress", st.sessions as f64);
    r.gauge("bkp_alerts_firing", "alert conditions firing", firing as f64);

    let mut out = String::new();
    encode(&mut out, &r.0).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_set_pushes_build_info_and_escaped_labels() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let c = Counters::default();
        c.push_done("web01", "db", true);
        c.push_done("web01", "db", true);
        c.push_done("web01", "db", false);
        c.push_done("we\"b", "x", true);
        let st = Status {
            sets: vec![],
            jobs: Default::default(),
            damaged: vec![],
            quarantined: 0,
            stats: Default::default(),
            logical_bytes: 0,
            disk: None,
            store_disk_bytes: 0,
            scrub: Default::default(),
            sessions: 0,
            push_failures: vec![],
            scheduled: vec![],
            sync: vec![],
            backend: None,
        };
        let text = render(&st, &c, 0, (3, 4));
        assert!(!text.contains("bkp_s3_"), "no object store, no s3 figures");
        assert!(text.contains("bkp_audit_dropped_total{reason=\"queue_full\"} 3"), "{text}");
        assert!(text.contains("bkp_audit_dropped_total{reason=\"rate_limit\"} 4"), "{text}");
        assert!(text.contains("bkp_pushes_total{host=\"web01\",name=\"db\",result=\"ok\"} 2"), "{text}");
        assert!(text.contains("bkp_pushes_total{host=\"web01\",name=\"db\",result=\"failed\"} 1"), "{text}");
        assert!(text.contains("bkp_pushes_total{host=\"we\\\"b\",name=\"x\",result=\"ok\"} 1"), "{text}");
        let build = format!("bkp_build_info{{version=\"{}\"}} 1", bkp_common::VERSION);
        assert!(text.contains(&build), "{text}");

        let b = crate::store::BackendStats {
            puts: 7,
            errors: 2,
            upload_queue_bytes: 1 << 20,
            unreachable_secs: Some(42),
            ..Default::default()
        };
        let text = render(&Status { backend: Some(b), ..st }, &c, 0, (0, 0));
        assert!(text.contains("bkp_s3_puts_total{} 7"), "{text}");
        assert!(text.contains("bkp_s3_errors_total{} 2"), "{text}");
        assert!(text.contains("bkp_s3_upload_queue_bytes 1048576.0"), "{text}");
        assert!(text.contains("bkp_s3_unreachable_seconds 42.0"), "{text}");
    }
}
