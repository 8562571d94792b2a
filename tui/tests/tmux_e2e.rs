//! The real binary in a real terminal (tmux, 80×24) with the real model and index: type a
//! question, wait for the answer, check steps, answer and a citation, quit cleanly.

mod common;

use std::path::Path;

use common::{data_dir, model_path};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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

/// The binary in a detached 80×24 tmux session; its exit status lands in a file.
struct Tui {
    session: Session,
    status: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Tui {
    fn start(dir: &Path, model: &str, index: &Path) -> Tui {
        let status = dir.join("status");
        let log = dir.join("tui.log");
        let script = format!(
            "GEEK_THREADS=2 GEEK_CALIBRATION={} GEEK_LOG={} {} --model {model} --index {}; echo $? > {}",
            dir.join("calibration.json").display(),
            log.display(),
            env!("CARGO_BIN_EXE_geek"),
            index.display(),
            status.display()
        );
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = Session(format!("geek-e2e-{}-{n}", std::process::id()));
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
        Tui {
            session,
            status,
            log,
        }
    }

    fn wait_for(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        wait_for(&self.session.0, what, Duration::from_secs(secs), done)
    }

    /// Types `question` and waits for the final answer's screen.
    fn ask(&self, question: &str) -> String {
        tmux(&["send-keys", "-t", &self.session.0, "-l", question]);
        tmux(&["send-keys", "-t", &self.session.0, "Enter"]);
        let screen = self.wait_for("the answer", 240, |s| s.contains("log-prob margin"));
        assert!(
            screen.contains("Q1 "),
            "no sub-question on screen:\n{screen}"
        );
        assert!(screen.contains("YES") || screen.contains("NO "), "{screen}");
        assert!(
            !screen.contains("WARN") && !screen.contains("INFO"),
            "logs leaked to the terminal:\n{screen}"
        );
        screen
    }

    /// Escape quits with status 0, logs in the log file.
    fn quit(self) {
        tmux(&["send-keys", "-t", &self.session.0, "Escape"]);
        let start = Instant::now();
        while !self.status.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "geek did not quit"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(std::fs::read_to_string(&self.status).unwrap().trim(), "0");
        assert!(self.log.exists(), "logs go to the log file");
    }
}

#[test]
fn ask_in_the_terminal_ui_and_quit() {
    let _model = common::one_model_at_a_time();
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
    let tui = Tui::start(dir.path(), &model_path().display().to_string(), &index);
    tui.wait_for("the model to load", 60, |s| s.contains("19284 passages"));
    // A question on which the test model's first fact cites its passage (with prompts v4,
    // its fact for the llama question is rejected as unsupported and answered uncited).
    let screen =
        tui.ask("Is the language used in Saint Vincent and the Grenadines rooted in English?");
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
    tui.quit();
}

/// The model given as a server's URL: the UI runs the agent on `geek serve` over HTTP.
#[test]
fn the_terminal_ui_runs_on_a_model_server() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Killed(
        Command::new(env!("CARGO_BIN_EXE_geek"))
            .args([
                "--model",
                model_path().to_str().unwrap(),
                "serve",
                "--port",
                "0",
            ])
            .args(["--no-retrieval", "--no-calibration"])
            .env("GEEK_THREADS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("geek serve starts"),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    // No index here: the UI says so and answers without retrieval.
    let tui = Tui::start(dir.path(), &base, &dir.path().join("no-index"));
    tui.wait_for("the server", 60, |s| s.contains(&format!("at {base}")));
    tui.ask("Is the Atlantic Ocean larger than Lake Geneva?");
    tui.quit();
    drop(server);
}

/// A child process killed when dropped, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
