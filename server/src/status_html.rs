//! The status page at `/` on the `[monitor]` listener: the
//! [`ServerStatus`] rendered by maud (every string auto-escaped: host, set
//! and path names come from clients), no JavaScript, reloading itself
//! every minute. Each set gets an inline SVG of its last 90 days: one bar
//! per snapshot, x = when, height = size; damaged snapshots in red.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::alerts::rfc3339 as time;
use crate::status::{ago, bytes, ServerStatus, SetView, HISTORY_DAYS};

const CHART_W: f64 = 360.0;
const CHART_H: f64 = 48.0;
const BAR_W: f64 = 3.0;

const CSS: &str = "body{font:14px/1.4 sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em}\
th,td{text-align:left;padding:.25em .7em;border-bottom:1px solid #ddd;vertical-align:top}\
.stale,.failed,.damaged{color:#b00;font-weight:bold}.fresh,.ok{color:#070}.unknown{color:#777}\
svg{background:#f6f6f6}rect.snap{fill:#4a7}rect.snap.damaged{fill:#c22}";

pub fn render(s: &ServerStatus) -> String {
    page(s).into_string()
}

fn page(s: &ServerStatus) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="60";
                title { "bkp-server status" }
                style { (PreEscaped(CSS)) }
            }
            body {
                h1 { "bkp-server status" }
                p { "As of " (time(s.generated_ns)) "; this page reloads every minute." }
                h2 { "Alerts" }
                @if s.alerts.is_empty() {
                    p.ok id="alerts" { "No alert is firing." }
                } @else {
                    ul id="alerts" {
                        @for a in &s.alerts { li.failed data-key=(a.key) { (a.summary) } }
                    }
                }
                h2 { "Backup sets" }
                table id="sets" {
                    tr { th { "Set" } th { "Newest snapshot" } th { "Age" } th { "State" } th { "Size" }
                         th { "Snapshots" } th { "Last " (HISTORY_DAYS) " days" } }
                    @for set in &s.sets { (set_row(set, s.generated_ns)) }
                }
                h2 { "Damaged snapshots" }
                @if s.damaged.is_empty() {
                    p.ok id="damaged" { "None: every verified snapshot restores." }
                } @else {
                    table id="damaged" {
                        tr { th { "Snapshot" } th { "Set" } th { "Taken" } th { "Found" } th { "Files" } }
                        @for d in &s.damaged {
                            tr.damaged data-snapshot=(d.id) {
                                td { (d.id[..8.min(d.id.len())]) " damaged" }
                                td { (d.host) "/" (d.name) }
                                td { (time(d.time_ns)) }
                                td { (time(d.found_ns)) }
                                td { (d.paths.join(", ")) @if d.more_paths > 0 { " and " (d.more_paths) " more" } }
                            }
                        }
                    }
                    p { "Push those sets again to heal the store, then run " code { "bkp-server verify" } "." }
                }
                h2 { "Jobs" }
                table id="jobs" {
                    tr { th { "Kind" } th { "Last run" } th { "Result" } th { "Last success" } }
                    @for j in &s.jobs {
                        tr {
                            td { (j.kind) @if j.scheduled { " (scheduled)" } }
                            @match &j.last {
                                None => { td { "never" } td.unknown { "-" } }
                                Some(r) => {
                                    td { (time(r.start_ns)) }
                                    @if r.ok { td.ok { "ok" } } @else {
                                        td.failed { "failed: " (r.error.as_deref().unwrap_or("")) }
                                    }
                                }
                            }
                            td { (j.last_ok_ns.map(time).unwrap_or_else(|| "never".into())) }
                        }
                    }
                }
                @if !s.sync.is_empty() {
                    h2 { "Second site: sync jobs pulling here" }
                    table id="sync" {
                        tr { th { "Job" } th { "Primary" } th { "Copies here" } th { "Last run" } th { "Last success" } th { "Sets lagging" } }
                        @for j in &s.sync {
                            tr data-sync=(j.name) {
                                td { (j.name) }
                                td { (j.server) }
                                td { (j.copies) }
                                td { (if j.last_run_ns == 0 { "never".into() } else { time(j.last_run_ns) }) }
                                td { (if j.last_ok_ns == 0 { "never".into() } else { time(j.last_ok_ns) }) }
                                @if j.lagging_sets > 0 { td.stale { (j.lagging_sets) } } @else { td.ok { "0" } }
                            }
                        }
                    }
                }
                h2 { "Verification" }
                p {
                    "Scrub: " (format!("{:.0}%", s.verify.scrub_coverage * 100.0)) " of this cycle covered; last full pass "
                    (if s.verify.scrub_last_cycle_end_ns == 0 { "never".into() } else { time(s.verify.scrub_last_cycle_end_ns) })
                    ". Restore drill: "
                    @match (s.verify.drill_last_ns, s.verify.drill_snapshots) {
                        (Some(t), Some(n)) => { (n) " snapshots at " (time(t)) }
                        (Some(t), None) => { "last run " (time(t)) }
                        _ => { "never run" }
                    }
                    "."
                    @if s.quarantined_chunks > 0 { " " span.damaged { (s.quarantined_chunks) " chunk(s) quarantined." } }
                }
                h2 { "Space" }
                table id="space" {
                    tr { th { "Backed up (logical)" } td { (bytes(s.space.logical_bytes)) } }
                    tr { th { "Unique chunks" } td { (s.space.chunks) " (" (bytes(s.space.raw_bytes)) ", " (bytes(s.space.stored_bytes)) " compressed)" } }
                    tr { th { "Store on disk" } td { (bytes(s.space.store_disk_bytes)) } }
                    @if let (Some(free), Some(total)) = (s.space.disk_free_bytes, s.space.disk_total_bytes) {
                        tr { th { "Disk free" } td { (bytes(free)) " of " (bytes(total)) } }
                    }
                }
            }
        }
    }
}

fn set_row(set: &SetView, now_ns: u64) -> Markup {
    let state = set.freshness.as_str();
    html! {
        tr data-set=(format!("{}/{}", set.host, set.name)) {
            td { (set.host) "/" (set.name) }
            td { code { (set.newest_id[..8.min(set.newest_id.len())]) } " " (time(set.newest_ns)) }
            td { (ago(set.age_secs)) }
            td class=(state) {
                (state)
                @if let Some(e) = set.expected_secs { " (expected every " (ago(e)) ")" }
                @if set.damaged > 0 { br; span.damaged { (set.damaged) " damaged" } }
                @if set.skipped > 0 { br; span.failed { "incomplete: " (set.skipped) " files not read" } }
                @if let Some(o) = &set.copy_of { br; span.copy { "copy from " (o) } }
            }
            td { (bytes(set.size_bytes)) }
            td { (set.snapshots) }
            td { (chart(set, now_ns)) }
        }
    }
}

/// Bars at their time in the 90-day window, heights relative to the
/// set's largest snapshot in it.
fn chart(set: &SetView, now_ns: u64) -> Markup {
    let span = (HISTORY_DAYS * 86_400 * 1_000_000_000) as f64;
    let start = now_ns as f64 - span;
    let max = set.history.iter().map(|p| p.bytes).max().unwrap_or(0).max(1) as f64;
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(CHART_W) height=(CHART_H)
            viewBox=(format!("0 0 {CHART_W} {CHART_H}")) role="img"
            aria-label=(format!("{} snapshots in the last {HISTORY_DAYS} days", set.history.len())) {
            @for p in &set.history {
                @let x = ((p.time_ns as f64 - start) / span * (CHART_W - BAR_W)).clamp(0.0, CHART_W - BAR_W);
                @let h = (p.bytes as f64 / max * (CHART_H - 2.0)).max(1.0);
                rect class=(if p.damaged { "snap damaged" } else { "snap" })
                    x=(format!("{x:.1}")) y=(format!("{:.1}", CHART_H - h)) width=(BAR_W) height=(format!("{h:.1}")) {
                    title { (time(p.time_ns)) ": " (bytes(p.bytes)) @if p.damaged { " (damaged)" } }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::*;

    fn sample() -> ServerStatus {
        let now = 200 * 86_400 * 1_000_000_000u64;
        ServerStatus {
            generated_ns: now,
            sets: vec![SetView {
                host: "web<01>".into(),
                name: "db&x".into(),
                snapshots: 2,
                newest_id: "ab".repeat(32),
                newest_ns: now - 10_000_000_000,
                age_secs: 10,
                expected_secs: Some(3600),
                freshness: Freshness::Stale,
                size_bytes: 2048,
                damaged: 1,
                skipped: 0,
                skipped_paths: Vec::new(),
                copy_of: Some("offsite (<b>:7443)".into()),
                history: vec![
                    Point { id: "01".repeat(32), time_ns: now - 86_400_000_000_000, bytes: 1000, damaged: true },
                    Point { id: "ab".repeat(32), time_ns: now - 10_000_000_000, bytes: 2048, damaged: false },
                ],
            }],
            jobs: Vec::new(),
            verify: VerifyView {
                scrub_coverage: 0.5,
                scrub_cycle_start_ns: 0,
                scrub_last_cycle_end_ns: 0,
                scrub_last_run_ns: 0,
                drill_last_ns: None,
                drill_snapshots: None,
            },
            damaged: Vec::new(),
            quarantined_chunks: 0,
            space: SpaceView {
                chunks: 0,
                logical_bytes: 0,
                raw_bytes: 0,
                stored_bytes: 0,
                store_disk_bytes: 0,
                disk_free_bytes: None,
                disk_total_bytes: None,
            },
            alerts: vec![AlertView { key: "k".into(), kind: "stale".into(), summary: "<script>x</script>".into() }],
            sync: vec![SyncView {
                name: "offsite".into(),
                server: "<b>:7443".into(),
                copies: 7,
                last_run_ns: 0,
                last_ok_ns: 0,
                lagging_sets: 1,
            }],
        }
    }

    #[test]
    fn names_from_clients_are_escaped_and_bars_are_drawn() {
        let html = render(&sample());
        assert!(html.contains("web&lt;01&gt;/db&amp;x"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("copy from offsite (&lt;b&gt;:7443)"), "{html}");
        assert!(html.contains("<tr data-sync=\"offsite\">"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains(r#"<meta http-equiv="refresh" content="60">"#));
        assert_eq!(html.matches("<rect ").count(), 2);
        assert_eq!(html.matches(r#"class="snap damaged""#).count(), 1);
        assert!(html.contains(r#"<td class="stale">stale"#), "{html}");
        // The newest bar is full height at the right edge.
        assert!(html.contains(r#"x="357.0" y="2.0" width="3" height="46.0""#), "{html}");
    }
}
