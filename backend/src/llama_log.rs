//! llama.cpp's own reasons for a failure.
//!
//! llama.cpp answers a file it rejects with a null pointer; the reason is a line it logs just
//! before. Its logs reach `tracing` on the thread that called it, so while a load runs this
//! module puts a thread-local subscriber in front that keeps the warning and error lines (and
//! passes every event on to the subscriber that was there), and the typed error carries them.

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Event, Level, Metadata, Subscriber};

/// Runs `f` and returns its result with the warning and error lines logged meanwhile on this
/// thread.
pub(crate) fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let previous = tracing::dispatcher::get_default(Dispatch::clone);
    let capture = Capture {
        lines: lines.clone(),
        previous,
    };
    let out = tracing::subscriber::with_default(capture, f);
    let lines = std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner()));
    (out, lines)
}

/// The last few captured lines, joined, for an error message.
pub(crate) fn reason(lines: &[String]) -> Option<String> {
    let tail: Vec<&str> = lines.iter().rev().take(3).rev().map(|l| l.trim()).collect();
    (!tail.is_empty()).then(|| tail.join("; "))
}

struct Capture {
    lines: Arc<Mutex<Vec<String>>>,
    previous: Dispatch,
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.previous.new_span(span)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.previous.record(span, values)
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.previous.record_follows_from(span, follows)
    }

    fn event(&self, event: &Event<'_>) {
        let level = *event.metadata().level();
        if level <= Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            if !message.0.trim().is_empty() {
                if let Ok(mut lines) = self.lines.lock() {
                    lines.push(message.0);
                }
            }
        }
        if self.previous.enabled(event.metadata()) {
            self.previous.event(event);
        }
    }

    fn enter(&self, span: &Id) {
        self.previous.enter(span)
    }

    fn exit(&self, span: &Id) {
        self.previous.exit(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_on_this_thread_are_kept() {
        let ((), lines) = capture(|| {
            tracing::info!("not kept");
            tracing::warn!("tensor 'x' has wrong shape");
            tracing::error!("failed to load model");
        });
        assert_eq!(
            lines,
            vec!["tensor 'x' has wrong shape", "failed to load model"]
        );
        assert_eq!(
            reason(&lines).unwrap(),
            "tensor 'x' has wrong shape; failed to load model"
        );
        assert_eq!(reason(&[]), None);
    }
}
