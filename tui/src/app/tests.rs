//! The TUI's state machine and screens, rendered into ratatui's TestBackend.

use geek_agent::{Event, PassageRef};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

use super::state::{App, Focus, Outcome, Popup, Report, Request, Settings};
use super::view;

fn settings() -> Settings {
    Settings {
        max_steps: 8,
        explore: 1,
        retrieval: true,
        model: "smollm2".into(),
    }
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn type_text(app: &mut App, text: &str) {
    for ch in text.chars() {
        app.on_key(key(KeyCode::Char(ch)));
    }
}

/// The screen as lines of text.
fn screen(app: &App, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| view::render(f, app)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    (0..height)
        .map(|y| {
            (0..width)
                .map(|x| buffer[(x, y)].symbol().to_string())
                .collect::<String>()
        })
        .collect()
}

fn excavated() -> App {
    let mut app = App::new(settings());
    app.on_report(Report::Ready {
        model: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        index_documents: 19284,
    });
    type_text(
        &mut app,
        "Could a llama give birth twice during the Vietnam War?",
    );
    let out = app.on_key(key(KeyCode::Enter));
    assert!(matches!(out, Outcome::Send(Request::Ask { .. })));
    let events = vec![
        Event::StepStarted {
            branch: 0,
            step: 1,
            action: geek_agent::Action::AddDecomp,
        },
        Event::SubQuestion {
            branch: 0,
            text: "How long is a llama pregnant?".into(),
        },
        Event::Retrieved {
            branch: 0,
            query: "How long is a llama pregnant?".into(),
            passages: vec![PassageRef {
                id: "Llama-3".into(),
                title: "Llama".into(),
                score: 12.0,
            }],
        },
        Event::FactExtracted {
            branch: 0,
            fact: "About 11.5 months.".into(),
            citations: vec!["Llama-3".into()],
        },
    ];
    for e in events {
        app.on_report(Report::Event(e));
    }
    app
}

#[test]
fn the_empty_screen_at_80x24() {
    let app = App::new(settings());
    let s = screen(&app, 80, 24);
    assert_eq!(
        s[0],
        format!(
            "┌ Question — Enter: ask · Tab: steps · ?: keys · Esc: quit {}┐",
            "─".repeat(20)
        )
    );
    assert_eq!(s[1], format!("│Type a yes/no question…{}│", " ".repeat(55)));
    assert!(s[4].starts_with("│Ask a question to watch the excavation."));
    assert!(s[17].starts_with("│No answer yet."));
    assert!(
        s[23].starts_with(" loading model… │ index 0 passages │  │ step 0/8 │ explore 1"),
        "{}",
        s[23]
    );
}

#[test]
fn steps_answer_and_citations_render() {
    let mut app = excavated();
    let s = screen(&app, 80, 24);
    assert!(s[4].starts_with("│Could a llama give birth twice during the Vietnam War?"));
    assert!(
        s[5].starts_with("│Q1 How long is a llama pregnant?"),
        "{}",
        s[5]
    );
    assert!(s[6].starts_with("│   search → Llama"));
    assert!(s[7].starts_with("│   A About 11.5 months. [Llama-3]"));
    assert!(s[8].starts_with("│   … AddDecomp:"), "{}", s.join("\n"));
    assert!(s[17].contains("excavating… (Ctrl-C cancels)"));

    let mut trace: geek_agent::Trace = serde_json::from_value(serde_json::json!({
        "version": 1, "question": "q", "answer": true, "yes_votes": 1, "no_votes": 0,
        "branches": [{"id": 0, "steps": [], "actions": [],
            "final_answer": {"summary": "Two pregnancies fit in twenty years.", "answer": true,
                             "yes_logprob": -0.3, "no_logprob": -1.5, "forced": false}}],
        "tokens": {"decoded": 500, "unique": 500, "without_reuse": 9000},
        "model": "m", "retriever": "bm25", "prompt_version": "v",
        "config": {"max_steps": 8, "explore": 1, "pre_answer": false, "retrieval": true, "passages": 3},
        "seconds": 5.0
    }))
    .unwrap();
    trace.question = app.current.as_ref().unwrap().question.clone();
    app.on_report(Report::Done(Box::new(trace)));
    let s = screen(&app, 80, 24);
    assert!(
        s[17].starts_with("│YES  (log-prob margin yes−no +1.20)"),
        "{}",
        s[17]
    );
    assert!(s[18].starts_with("│Two pregnancies fit in twenty years."));
    assert!(s[19].starts_with("│• About 11.5 months."));
    assert!(
        s[23].contains("100 tok/s") && s[23].contains("index 19284 passages"),
        "{}",
        s[23]
    );

    // A citation can be selected and read.
    app.on_key(key(KeyCode::Tab));
    assert_eq!(app.focus, Focus::Steps);
    app.on_key(key(KeyCode::Right));
    assert_eq!(app.selected_citation, Some(0));
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        Outcome::Send(Request::Passage("Llama-3".into()))
    );
    app.on_report(Report::Passage {
        title: "Llama (Llama-3)".into(),
        text: "The gestation period is 350 days.".into(),
    });
    let s = screen(&app, 80, 24);
    assert!(s.iter().any(|l| l.contains("Llama (Llama-3)")));
    assert!(s
        .iter()
        .any(|l| l.contains("The gestation period is 350 days.")));
}

#[test]
fn wide_screens_put_the_answer_beside_the_steps() {
    let app = excavated();
    let s = screen(&app, 120, 30);
    assert!(s[3].contains("┐┌ Answer"), "{}", s[3]);
}

#[test]
fn keys_cancel_quit_and_open_popups() {
    let mut app = excavated();
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(app.on_key(ctrl_c), Outcome::Send(Request::Cancel));
    app.on_report(Report::Cancelled);
    assert!(!app.running());
    assert_eq!(app.on_key(ctrl_c), Outcome::Continue, "Ctrl-C never quits");
    // Typing 'q' in the question box is text, not quit.
    app.on_key(key(KeyCode::Char('q')));
    assert_eq!(app.input, "q");
    app.on_key(key(KeyCode::Tab));
    app.on_key(key(KeyCode::Char('?')));
    assert_eq!(app.popup, Some(Popup::Help));
    assert!(screen(&app, 80, 24)
        .iter()
        .any(|l| l.contains("Ctrl-C     cancel the running excavation")));
    app.on_key(key(KeyCode::Esc));
    assert_eq!(app.popup, None, "Esc closes the popup first");
    assert_eq!(app.on_key(key(KeyCode::Char('q'))), Outcome::Quit);
    assert_eq!(app.on_key(key(KeyCode::Esc)), Outcome::Quit);
}

#[test]
fn settings_and_history() {
    let mut app = excavated();
    app.on_report(Report::Cancelled);
    app.on_key(key(KeyCode::Tab));
    app.on_key(key(KeyCode::Char('s')));
    app.on_key(key(KeyCode::Right)); // max steps 8 -> 9
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Right)); // explore 1 -> 2
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Left)); // retrieval off
    app.on_key(key(KeyCode::Down));
    for _ in 0.."smollm2".len() {
        app.on_key(key(KeyCode::Backspace));
    }
    for ch in "/m/other.gguf".chars() {
        app.on_key(key(KeyCode::Char(ch)));
    }
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        Outcome::Send(Request::LoadModel("/m/other.gguf".into()))
    );
    assert_eq!(
        (
            app.settings.max_steps,
            app.settings.explore,
            app.settings.retrieval
        ),
        (9, 2, false)
    );
    assert!(screen(&app, 80, 24)[23].contains("retrieval off"));

    // A second question moves the first into the history; it can be reopened.
    app.on_key(key(KeyCode::Tab));
    type_text(&mut app, "Is water wet?");
    assert!(
        matches!(app.on_key(key(KeyCode::Enter)), Outcome::Send(Request::Ask { settings, .. }) if settings.max_steps == 9)
    );
    app.on_report(Report::Cancelled);
    app.on_key(key(KeyCode::Tab));
    app.on_key(key(KeyCode::Char('h')));
    assert_eq!(app.popup, Some(Popup::History(0)));
    app.on_key(key(KeyCode::Enter));
    assert_eq!(
        app.current.as_ref().unwrap().question,
        "Could a llama give birth twice during the Vietnam War?"
    );
    assert_eq!(app.history[0].question, "Is water wet?");
}

#[test]
fn problems_show_what_to_do() {
    let mut app = App::new(settings());
    app.on_report(Report::Problem(
        "no index at /x; build one with `geek index build`".into(),
    ));
    let s = screen(&app, 80, 24);
    assert!(s[17].contains("geek index build"), "{}", s[17]);
}
