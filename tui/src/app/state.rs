//! The TUI's state, updated by key presses and by the engine's events. No terminal here, so
//! it is tested directly.

use std::time::Instant;

use geek_agent::{Event, Trace};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What the UI asks the engine thread to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Excavate a question with these settings.
    Ask {
        /// The question.
        question: String,
        /// Settings at the time of asking.
        settings: Settings,
    },
    /// Stop the running excavation.
    Cancel,
    /// Look up a passage's full text.
    Passage(String),
    /// Load another model.
    LoadModel(String),
}

/// What the engine thread reports.
#[derive(Debug, Clone)]
pub enum Report {
    /// The model and index are loaded.
    Ready {
        /// Model description.
        model: String,
        /// Passages in the index (0 without one).
        index_documents: usize,
    },
    /// An excavation event.
    Event(Event),
    /// The excavation ended.
    Done(Box<Trace>),
    /// The excavation was cancelled.
    Cancelled,
    /// A passage's text.
    Passage {
        /// Title.
        title: String,
        /// Full text.
        text: String,
    },
    /// Something failed; the text says what to do.
    Problem(String),
}

/// Settings reachable in the UI.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Step budget.
    pub max_steps: usize,
    /// Branches explored.
    pub explore: usize,
    /// Retrieval on/off.
    pub retrieval: bool,
    /// Model file or catalogue name.
    pub model: String,
}

/// One line of the steps panel.
#[derive(Debug, Clone, PartialEq)]
pub enum StepLine {
    /// A sub-question.
    Question(String),
    /// A retrieval with the titles found.
    Search(String, Vec<String>),
    /// A fact with the passage ids it cites.
    Fact(String, Vec<String>),
    /// A problem during the run.
    Note(String),
}

/// An excavation as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Excavation {
    /// The question.
    pub question: String,
    /// Steps of the main branch, in order.
    pub lines: Vec<StepLine>,
    /// Text the model is generating now.
    pub streaming: String,
    /// The final answer: yes/no, log-prob margin, summary.
    pub answer: Option<(bool, f32, String)>,
    /// Citations in order of appearance: (passage id, title).
    pub citations: Vec<(String, String)>,
    /// Actions started.
    pub step: usize,
    /// The action the main branch is working on.
    pub action: Option<geek_agent::Action>,
    /// Streamed pieces (≈ tokens) and when streaming started.
    pub pieces: usize,
    /// Start of the run.
    pub started: Option<Instant>,
    /// Whether it is still running.
    pub running: bool,
    /// Tokens per second of the finished run.
    pub tokens_per_second: Option<f64>,
}

impl Excavation {
    fn new(question: String) -> Self {
        Excavation {
            question,
            lines: Vec::new(),
            streaming: String::new(),
            answer: None,
            citations: Vec::new(),
            step: 0,
            action: None,
            pieces: 0,
            started: Some(Instant::now()),
            running: true,
            tokens_per_second: None,
        }
    }

    fn title_of(&self, id: &str) -> String {
        self.citations
            .iter()
            .find(|c| c.0 == id)
            .map_or(id.to_string(), |c| c.1.clone())
    }
}

/// Popups over the main screen.
#[derive(Debug, Clone, PartialEq)]
pub enum Popup {
    /// The keys.
    Help,
    /// A passage.
    Passage(String, String),
    /// Settings, with the selected row and the model path being edited.
    Settings(usize, String),
    /// Earlier questions, with the selected row.
    History(usize),
}

/// Where typing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// The question box.
    Input,
    /// The steps panel (scroll, citations).
    Steps,
}

/// What a key press asks of the loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing more.
    Continue,
    /// Leave the app.
    Quit,
    /// Send this to the engine thread.
    Send(Request),
}

/// Everything the screen shows.
#[derive(Debug, Clone)]
pub struct App {
    /// The question being typed.
    pub input: String,
    /// Where keys go.
    pub focus: Focus,
    /// The excavation on screen.
    pub current: Option<Excavation>,
    /// Earlier excavations of this session, newest last.
    pub history: Vec<Excavation>,
    /// Settings.
    pub settings: Settings,
    /// Model description, once loaded.
    pub model: Option<String>,
    /// Passages in the index.
    pub index_documents: usize,
    /// The open popup.
    pub popup: Option<Popup>,
    /// First visible line of the steps panel.
    pub scroll: usize,
    /// Selected citation of the current excavation.
    pub selected_citation: Option<usize>,
    /// A problem to show, with what to do.
    pub problem: Option<String>,
}

impl App {
    /// A fresh screen.
    pub fn new(settings: Settings) -> Self {
        App {
            input: String::new(),
            focus: Focus::Input,
            current: None,
            history: Vec::new(),
            settings,
            model: None,
            index_documents: 0,
            popup: None,
            scroll: 0,
            selected_citation: None,
            problem: None,
        }
    }

    /// Whether an excavation runs.
    pub fn running(&self) -> bool {
        self.current.as_ref().is_some_and(|c| c.running)
    }

    /// Applies a report from the engine thread.
    pub fn on_report(&mut self, report: Report) {
        match report {
            Report::Ready {
                model,
                index_documents,
            } => {
                self.model = Some(model);
                self.index_documents = index_documents;
                self.problem = None;
            }
            Report::Problem(p) => {
                self.problem = Some(p);
                if let Some(c) = &mut self.current {
                    c.running = false;
                }
            }
            Report::Passage { title, text } => self.popup = Some(Popup::Passage(title, text)),
            Report::Cancelled => {
                if let Some(c) = &mut self.current {
                    c.running = false;
                    c.streaming.clear();
                    c.lines.push(StepLine::Note("cancelled".into()));
                }
            }
            Report::Done(trace) => {
                if let Some(c) = &mut self.current {
                    c.running = false;
                    c.streaming.clear();
                    let f = &trace.main_branch().final_answer;
                    c.answer = Some((
                        trace.answer,
                        f.yes_logprob - f.no_logprob,
                        f.summary.clone(),
                    ));
                    c.tokens_per_second =
                        Some(trace.tokens.decoded as f64 / trace.seconds.max(1e-9));
                }
            }
            Report::Event(event) => self.on_event(event),
        }
    }

    fn on_event(&mut self, event: Event) {
        let Some(c) = &mut self.current else { return };
        match event {
            // The panel follows the greedy branch; others only vote.
            Event::StepStarted {
                branch: 0, action, ..
            } => {
                c.step += 1;
                c.action = Some(action);
                c.streaming.clear();
            }
            Event::SubQuestion { branch: 0, text } => c.lines.push(StepLine::Question(text)),
            Event::Retrieved {
                branch: 0,
                query,
                passages,
            } => {
                for p in &passages {
                    if !c.citations.iter().any(|x| x.0 == p.id) {
                        c.citations.push((p.id.clone(), p.title.clone()));
                    }
                }
                c.lines.push(StepLine::Search(
                    query,
                    passages.into_iter().map(|p| p.title).collect(),
                ));
            }
            Event::FactExtracted {
                branch: 0,
                fact,
                citations,
            } => {
                c.streaming.clear();
                c.lines.push(StepLine::Fact(fact, citations));
            }
            Event::TokenStream { branch, text } => {
                c.pieces += 1;
                if branch == 0 {
                    c.streaming.push_str(&text);
                }
            }
            Event::Error { message, .. } => c.lines.push(StepLine::Note(message)),
            _ => {}
        }
    }

    /// Cited passage ids of the current excavation, in order, without repeats.
    pub fn cited(&self) -> Vec<(String, String)> {
        let Some(c) = &self.current else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for line in &c.lines {
            if let StepLine::Fact(_, ids) = line {
                for id in ids {
                    if !out.iter().any(|o| &o.0 == id) {
                        out.push((id.clone(), c.title_of(id)));
                    }
                }
            }
        }
        out
    }

    /// Handles one key press.
    // Longer than 80 lines: the main screen's key table: one arm per key.
    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && key.code == KeyCode::Char('c') {
            return if self.running() {
                Outcome::Send(Request::Cancel)
            } else {
                Outcome::Continue
            };
        }
        if let Some(popup) = self.popup.clone() {
            return self.on_popup_key(popup, key);
        }
        match (self.focus, key.code) {
            (_, KeyCode::Esc) => Outcome::Quit,
            (_, KeyCode::Tab) => {
                self.focus = if self.focus == Focus::Input {
                    Focus::Steps
                } else {
                    Focus::Input
                };
                Outcome::Continue
            }
            (Focus::Input, KeyCode::Enter) => {
                let question = self.input.trim().to_string();
                if question.is_empty() || self.running() {
                    return Outcome::Continue;
                }
                self.input.clear();
                if let Some(done) = self.current.take() {
                    self.history.push(done);
                }
                self.current = Some(Excavation::new(question.clone()));
                self.scroll = 0;
                self.selected_citation = None;
                self.problem = None;
                Outcome::Send(Request::Ask {
                    question,
                    settings: self.settings.clone(),
                })
            }
            (Focus::Input, KeyCode::Backspace) => {
                self.input.pop();
                Outcome::Continue
            }
            (Focus::Input, KeyCode::Char(ch)) => {
                self.input.push(ch);
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Char('q')) => Outcome::Quit,
            (Focus::Steps, KeyCode::Char('?')) => {
                self.popup = Some(Popup::Help);
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Char('s')) => {
                self.popup = Some(Popup::Settings(0, self.settings.model.clone()));
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Char('h')) if !self.history.is_empty() => {
                self.popup = Some(Popup::History(self.history.len() - 1));
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Up) => {
                self.scroll = self.scroll.saturating_sub(1);
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Down) => {
                self.scroll += 1;
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Left | KeyCode::Right) => {
                let n = self.cited().len();
                if n > 0 {
                    let cur = self.selected_citation.unwrap_or(0);
                    self.selected_citation = Some(match (key.code, self.selected_citation) {
                        (_, None) => 0,
                        (KeyCode::Right, _) => (cur + 1) % n,
                        _ => (cur + n - 1) % n,
                    });
                }
                Outcome::Continue
            }
            (Focus::Steps, KeyCode::Enter) => match self
                .selected_citation
                .and_then(|i| self.cited().get(i).cloned())
            {
                Some((id, _)) => Outcome::Send(Request::Passage(id)),
                None => Outcome::Continue,
            },
            _ => Outcome::Continue,
        }
    }

    // Longer than 80 lines: the popups' key tables: one arm per popup and key.
    fn on_popup_key(&mut self, popup: Popup, key: KeyEvent) -> Outcome {
        match popup {
            Popup::Settings(row, mut model) => match key.code {
                KeyCode::Esc => {
                    self.popup = None;
                    Outcome::Continue
                }
                KeyCode::Up => {
                    self.popup = Some(Popup::Settings(row.saturating_sub(1), model));
                    Outcome::Continue
                }
                KeyCode::Down => {
                    self.popup = Some(Popup::Settings((row + 1).min(3), model));
                    Outcome::Continue
                }
                KeyCode::Left | KeyCode::Right => {
                    let up = key.code == KeyCode::Right;
                    let s = &mut self.settings;
                    match row {
                        0 => {
                            s.max_steps = if up {
                                (s.max_steps + 1).min(32)
                            } else {
                                s.max_steps.saturating_sub(1).max(1)
                            }
                        }
                        1 => {
                            s.explore = if up {
                                (s.explore + 1).min(8)
                            } else {
                                s.explore.saturating_sub(1).max(1)
                            }
                        }
                        2 => s.retrieval = !s.retrieval,
                        _ => {}
                    }
                    self.popup = Some(Popup::Settings(row, model));
                    Outcome::Continue
                }
                KeyCode::Char(ch) if row == 3 => {
                    model.push(ch);
                    self.popup = Some(Popup::Settings(row, model));
                    Outcome::Continue
                }
                KeyCode::Backspace if row == 3 => {
                    model.pop();
                    self.popup = Some(Popup::Settings(row, model));
                    Outcome::Continue
                }
                KeyCode::Enter => {
                    self.popup = None;
                    if row == 3 && model != self.settings.model && !self.running() {
                        self.settings.model = model.clone();
                        self.model = None;
                        return Outcome::Send(Request::LoadModel(model));
                    }
                    Outcome::Continue
                }
                _ => Outcome::Continue,
            },
            Popup::History(row) => match key.code {
                KeyCode::Up => {
                    self.popup = Some(Popup::History(row.saturating_sub(1)));
                    Outcome::Continue
                }
                KeyCode::Down => {
                    self.popup = Some(Popup::History(
                        (row + 1).min(self.history.len().saturating_sub(1)),
                    ));
                    Outcome::Continue
                }
                KeyCode::Enter if !self.running() => {
                    self.popup = None;
                    let chosen = self.history.remove(row);
                    if let Some(now) = self.current.replace(chosen) {
                        self.history.push(now);
                    }
                    self.scroll = 0;
                    self.selected_citation = None;
                    Outcome::Continue
                }
                _ => {
                    self.popup = None;
                    Outcome::Continue
                }
            },
            Popup::Help | Popup::Passage(..) => {
                self.popup = None;
                Outcome::Continue
            }
        }
    }
}
