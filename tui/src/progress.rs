//! Progress bars: the libraries report progress as events; only the binary draws.

use geek_backend::catalog::PullProgress;
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

/// A byte-counting bar of `total` bytes (a spinner when 0; hidden when not `visible`).
pub fn bytes_bar(visible: bool, total: u64, message: &str) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = if total > 0 {
        ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    } else {
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        )
    };
    bar.set_message(message.to_string());
    bar
}

/// Moves the bar of a model pull of `name`.
pub fn show_pull(bar: &ProgressBar, name: &str, p: PullProgress) {
    bar.set_position(p.bytes);
    if p.parts > 1 {
        bar.set_message(format!("fetching {name} (part {}/{})", p.part, p.parts));
    }
}

/// A bar over optimizer steps (hidden when stderr is not a terminal).
pub fn steps_bar(len: u64) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// A line above the bar — or on stderr when the bar is hidden (not a terminal), where
/// indicatif would drop it.
pub fn note(bar: &ProgressBar, line: impl Into<String>) {
    let line = line.into();
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}
