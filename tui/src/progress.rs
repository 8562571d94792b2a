//! Progress bars: the libraries report progress as events; only the binary draws.

use geek_evals::run::RunProgress;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar for an evaluation run (hidden when stderr is not a terminal).
pub fn run_bar(visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// Moves the bar of an evaluation run.
pub fn show_run(bar: &ProgressBar, progress: RunProgress) {
    match progress {
        RunProgress::Started { total, done } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        RunProgress::Answered {
            done,
            acc,
            per_minute,
            ..
        } => {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "acc {} | {per_minute:.1} q/min",
                acc.map_or("-".into(), |a| format!("{a:.3}"))
            ));
        }
    }
}
