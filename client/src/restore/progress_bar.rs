//! A restore's progress on a terminal: a bar with the total (the
//! snapshot's size, or what `--include`/`--exclude` keep) and an ETA.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::progress::{Progress, Silent};

pub struct RestoreBar {
    bar: ProgressBar,
}

impl Progress for RestoreBar {
    fn restored(&self, b: u64) {
        self.bar.inc(b);
    }

    fn restore_total(&self, bytes: u64) {
        self.bar.set_length(bytes);
        self.bar.reset_eta();
    }
}

impl Drop for RestoreBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// A bar when stderr is a terminal, else nothing.
pub fn restore_progress() -> Arc<dyn Progress> {
    if !std::io::stderr().is_terminal() {
        return Arc::new(Silent);
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec}, {elapsed} so far, ETA {eta}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Arc::new(RestoreBar { bar })
}
