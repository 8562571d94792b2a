//! `geek tui`: ask questions and watch the excavation happen.
//!
//! The engine runs on its own thread (`worker`); this thread only handles keys and draws,
//! polling for input every 50 ms. Logs go to a file, never to the terminal, and
//! `ratatui::run` restores the terminal even on panic.

pub mod state;
pub mod view;
mod worker;

use std::time::Duration;

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::config::Resolved;
use state::{App, Outcome, Settings};

/// Runs the TUI until the user quits.
pub fn run(config: &Resolved) -> Result<()> {
    let settings = Settings {
        max_steps: 8,
        explore: 1,
        retrieval: true,
        model: config.model_spec.clone(),
    };
    let (requests, reports) = worker::spawn(config.clone(), settings.clone());
    let mut app = App::new(settings);
    ratatui::run(|terminal| -> Result<()> {
        loop {
            while let Ok(report) = reports.try_recv() {
                app.on_report(report);
            }
            terminal.draw(|frame| view::render(frame, &app))?;
            if !event::poll(Duration::from_millis(50))? {
                continue;
            }
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match app.on_key(key) {
                    Outcome::Continue => {}
                    Outcome::Quit => return Ok(()),
                    Outcome::Send(request) => {
                        let _ = requests.send(request);
                    }
                }
            }
        }
    })
}
#[cfg(test)]
mod tests;
