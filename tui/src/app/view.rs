//! Drawing the state. Works from 80×24 up: below 100 columns the answer sits under the steps.

use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::state::{App, Focus, Popup, StepLine};

/// Draws the whole screen.
pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Length(3),
            Constraint::Min(6),
            Constraint::Length(1),
        ])
        .split(area);
    render_input(frame, app, rows[0]);
    let (steps, answer) = if area.width >= 100 {
        let cols = Layout::default()
            .direction(Direction::Horizontal)
            .constraints([Constraint::Percentage(60), Constraint::Percentage(40)])
            .split(rows[1]);
        (cols[0], cols[1])
    } else {
        let parts = Layout::default()
            .direction(Direction::Vertical)
            .constraints([Constraint::Min(4), Constraint::Length(7)])
            .split(rows[1]);
        (parts[0], parts[1])
    };
    render_steps(frame, app, steps);
    render_answer(frame, app, answer);
    render_status(frame, app, rows[2]);
    if let Some(popup) = &app.popup {
        render_popup(frame, app, popup, area);
    }
}

fn focused(on: bool) -> Style {
    if on {
        Style::default().fg(Color::Cyan)
    } else {
        Style::default()
    }
}

fn render_input(frame: &mut Frame, app: &App, area: Rect) {
    let title = " Question — Enter: ask · Tab: steps · ?: keys · Esc: quit ";
    let block = Block::default()
        .borders(Borders::ALL)
        .title(title)
        .border_style(focused(app.focus == Focus::Input));
    let text = if app.input.is_empty() && app.focus == Focus::Input {
        Line::from(Span::styled(
            "Type a yes/no question…",
            Style::default().fg(Color::DarkGray),
        ))
    } else {
        Line::from(app.input.as_str())
    };
    frame.render_widget(Paragraph::new(text).block(block), area);
}

/// The lines of the steps panel.
pub fn step_lines(app: &App) -> Vec<Line<'static>> {
    let Some(c) = &app.current else {
        return vec![Line::from("Ask a question to watch the excavation.")];
    };
    let cited = app.cited();
    let selected = app
        .selected_citation
        .and_then(|i| cited.get(i))
        .map(|c| c.0.clone());
    let mut lines = vec![Line::from(Span::styled(
        c.question.clone(),
        Style::default().add_modifier(Modifier::BOLD),
    ))];
    let mut q = 0;
    for l in &c.lines {
        match l {
            StepLine::Question(text) => {
                q += 1;
                lines.push(Line::from(vec![
                    Span::styled(format!("Q{q} "), Style::default().fg(Color::Yellow)),
                    Span::raw(text.clone()),
                ]));
            }
            StepLine::Search(_, titles) => lines.push(Line::from(Span::styled(
                format!("   search → {}", titles.join(" · ")),
                Style::default().fg(Color::DarkGray),
            ))),
            StepLine::Fact(text, ids) => {
                let mut spans = vec![
                    Span::styled("   A ", Style::default().fg(Color::Green)),
                    Span::raw(text.clone()),
                ];
                for id in ids {
                    let style = if selected.as_deref() == Some(id.as_str()) {
                        Style::default().fg(Color::Black).bg(Color::Cyan)
                    } else {
                        Style::default().fg(Color::Cyan)
                    };
                    spans.push(Span::raw(" "));
                    spans.push(Span::styled(format!("[{id}]"), style));
                }
                lines.push(Line::from(spans));
            }
            StepLine::Note(text) => lines.push(Line::from(Span::styled(
                format!("   ! {text}"),
                Style::default().fg(Color::Red),
            ))),
        }
    }
    if c.running {
        let action = c.action.map_or("thinking", |a| a.keyword());
        lines.push(Line::from(Span::styled(
            format!("   … {action}: {}", c.streaming.trim()),
            Style::default().fg(Color::Magenta),
        )));
    }
    lines
}

fn render_steps(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::default()
        .borders(Borders::ALL)
        .title(" Steps — ↑↓ scroll · ←→ citation · Enter: read ")
        .border_style(focused(app.focus == Focus::Steps));
    let p = Paragraph::new(step_lines(app))
        .block(block)
        .wrap(Wrap { trim: false })
        .scroll((app.scroll as u16, 0));
    frame.render_widget(p, area);
}

fn render_answer(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::default().borders(Borders::ALL).title(" Answer ");
    let mut lines = Vec::new();
    if let Some(problem) = &app.problem {
        lines.push(Line::from(Span::styled(
            problem.clone(),
            Style::default().fg(Color::Red),
        )));
    }
    match app.current.as_ref() {
        Some(c) => match &c.answer {
            Some((yes, margin, summary)) => {
                let word = if *yes { "YES" } else { "NO" };
                lines.push(Line::from(vec![
                    Span::styled(
                        word,
                        Style::default().add_modifier(Modifier::BOLD).fg(if *yes {
                            Color::Green
                        } else {
                            Color::Red
                        }),
                    ),
                    Span::raw(format!("  (log-prob margin yes−no {margin:+.2})")),
                ]));
                lines.push(Line::from(summary.clone()));
                for l in &c.lines {
                    if let StepLine::Fact(text, _) = l {
                        lines.push(Line::from(format!("• {text}")));
                    }
                }
            }
            None if c.running => lines.push(Line::from("excavating… (Ctrl-C cancels)")),
            None => {}
        },
        None if app.problem.is_none() => lines.push(Line::from("No answer yet.")),
        None => {}
    }
    frame.render_widget(
        Paragraph::new(lines).block(block).wrap(Wrap { trim: true }),
        area,
    );
}

/// The status line text.
pub fn status_text(app: &App) -> String {
    let model = app.model.as_deref().unwrap_or("loading model…");
    let index = if app.settings.retrieval {
        format!("index {} passages", app.index_documents)
    } else {
        "retrieval off".to_string()
    };
    let (speed, step) = match &app.current {
        Some(c) => {
            let tps = c.tokens_per_second.or_else(|| {
                c.started
                    .map(|s| c.pieces as f64 / s.elapsed().as_secs_f64().max(1e-3))
            });
            (
                tps.map_or(String::new(), |t| format!("{t:.0} tok/s")),
                format!(
                    "step {}/{}",
                    c.step.min(app.settings.max_steps + 1),
                    app.settings.max_steps
                ),
            )
        }
        None => (String::new(), format!("step 0/{}", app.settings.max_steps)),
    };
    format!(
        " {model} │ {index} │ {speed} │ {step} │ explore {} ",
        app.settings.explore
    )
}

fn render_status(frame: &mut Frame, app: &App, area: Rect) {
    frame.render_widget(
        Paragraph::new(status_text(app))
            .style(Style::default().bg(Color::DarkGray).fg(Color::White)),
        area,
    );
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn render_popup(frame: &mut Frame, app: &App, popup: &Popup, area: Rect) {
    let (title, lines): (String, Vec<Line>) = match popup {
        Popup::Help => (
            " Keys ".into(),
            [
                "Enter      ask the typed question",
                "Tab        switch between question and steps",
                "↑ ↓        scroll the steps",
                "← →        select a citation; Enter reads the passage",
                "h          history of this session (Enter reopens)",
                "s          settings",
                "Ctrl-C     cancel the running excavation",
                "q / Esc    quit (Esc closes a popup first)",
            ]
            .into_iter()
            .map(Line::from)
            .collect(),
        ),
        Popup::Passage(title, text) => (format!(" {title} "), vec![Line::from(text.clone())]),
        Popup::Settings(row, model) => {
            let s = &app.settings;
            let items = [
                format!("max steps   ◂ {} ▸", s.max_steps),
                format!("explore K   ◂ {} ▸", s.explore),
                format!("retrieval   ◂ {} ▸", if s.retrieval { "on" } else { "off" }),
                format!("model       {model}"),
            ];
            let mut lines: Vec<Line> = items
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let style = if i == *row {
                        Style::default().fg(Color::Black).bg(Color::Cyan)
                    } else {
                        Style::default()
                    };
                    Line::from(Span::styled(t, style))
                })
                .collect();
            lines.push(Line::from(""));
            lines.push(Line::from(
                "↑↓ choose · ←→ change · type a model or URL · Enter applies",
            ));
            (" Settings ".into(), lines)
        }
        Popup::History(row) => (
            " History — Enter reopens ".into(),
            app.history
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let answer = e
                        .answer
                        .as_ref()
                        .map_or("–", |a| if a.0 { "yes" } else { "no" });
                    let style = if i == *row {
                        Style::default().fg(Color::Black).bg(Color::Cyan)
                    } else {
                        Style::default()
                    };
                    Line::from(Span::styled(format!("{answer:>3}  {}", e.question), style))
                })
                .collect(),
        ),
    };
    let rect = centered(
        area,
        area.width.saturating_sub(8).max(40),
        (lines.len() as u16 + 4)
            .min(area.height.saturating_sub(2))
            .max(6),
    );
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::default().borders(Borders::ALL).title(title))
            .wrap(Wrap { trim: false }),
        rect,
    );
}
