//! The real binary in a real terminal (tmux, 80×24) with the real model and index: type a
//! question, wait for the answer, check steps, answer and a citation, quit cleanly.

mod common;

use std::path::Path;

use common::{data_dir, model_path};
use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is installed (scripts/install-deps.sh)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(session: &str, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let screen = tmux(&["capture-pane", "-t", session, "-p"]);
        if done(&screen) {
            return screen;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}; screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

#[test]
fn ask_in_the_terminal_ui_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let geek = env!("CARGO_BIN_EXE_geek");
    let built = Command::new(geek)
        .args([
            "index",
            "build",
            "--index",
            index.to_str().unwrap(),
            "--data-dir",
            data_dir().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(built.status.success());
    let status = dir.path().join("status");
    let log = dir.path().join("tui.log");
    let script = format!(
        "GEEK_THREADS=2 GEEK_CALIBRATION={} GEEK_LOG={} {geek} --model {} --index {}; echo $? > {}",
        dir.path().join("calibration.json").display(),
        log.display(),
        model_path().display(),
        index.display(),
        status.display()
    );
    let session = Session(format!("geek-e2e-{}", std::process::id()));
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "80",
        "-y",
        "24",
        &script,
    ]);
    wait_for(
        &session.0,
        "the model to load",
        Duration::from_secs(60),
        |s| s.contains("19284 passages"),
    );

    tmux(&[
        "send-keys",
        "-t",
        &session.0,
        "-l",
        // A question on which the test model's first fact cites its passage (with prompts v4,
        // its fact for the llama question is rejected as unsupported and answered uncited).
        "Is the language used in Saint Vincent and the Grenadines rooted in English?",
    ]);
    tmux(&["send-keys", "-t", &session.0, "Enter"]);
    let screen = wait_for(&session.0, "the answer", Duration::from_secs(240), |s| {
        s.contains("log-prob margin")
    });
    assert!(
        screen.contains("Q1 "),
        "no sub-question on screen:\n{screen}"
    );
    assert!(
        screen.contains("search → "),
        "no retrieval on screen:\n{screen}"
    );
    assert!(
        // The citation follows the fact, on its line or wrapped onto the next.
        screen
            .lines()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0].contains("   A ") && (w[0].contains('[') || w[1].contains('['))),
        "no cited fact:\n{screen}"
    );
    assert!(screen.contains("YES") || screen.contains("NO "), "{screen}");
    assert!(
        !screen.contains("WARN") && !screen.contains("INFO"),
        "logs leaked to the terminal:\n{screen}"
    );

    tmux(&["send-keys", "-t", &session.0, "Escape"]);
    let start = Instant::now();
    while !status.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "geek did not quit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "0");
    assert!(Path::new(&log).exists(), "logs go to the log file");
}
