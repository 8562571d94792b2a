//! geek's remote backend against the reference server: llama.cpp's own `llama-server`, built
//! once by `scripts/build-llama-server.sh` into a cache directory (CI builds it before the
//! tests; on a fresh machine the first run of this test builds it, which takes minutes).

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::model_path;

/// The llama-server binary, built if missing.
fn llama_server() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/build-llama-server.sh"
    );
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "scripts/build-llama-server.sh failed: it needs pip, cmake and a C++ compiler"
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.is_file(), "{} is not built", path.display());
    path
}

/// A running llama-server, killed when dropped.
struct LlamaServer {
    child: Child,
    base: String,
}

impl LlamaServer {
    /// Two slots: the excavation's prompt keeps one while the final answer's short prompt
    /// takes the other, so the next question still finds the system prompt cached.
    fn start() -> LlamaServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(llama_server())
            .arg("-m")
            .arg(model_path())
            .args(["-t", "2", "-np", "2", "-c", "8192", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        let server = LlamaServer {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let end = Instant::now() + Duration::from_secs(120);
        while !server.healthy() {
            assert!(Instant::now() < end, "llama-server did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    fn healthy(&self) -> bool {
        Command::new("curl")
            .args(["-sf", &format!("{}/health", self.base)])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ask(base: &str, question: &str) -> serde_json::Value {
    common::json_output(
        Command::new(env!("CARGO_BIN_EXE_geek"))
            .args([
                "ask",
                "--endpoint",
                base,
                "--no-retrieval",
                "--no-calibration",
            ])
            .args(["--json", "--max-steps", "4", question])
            .env("GEEK_CALIBRATION", common::calibration_store()),
    )
}

/// The agent on llama-server: grammar-constrained steps, yes/no scores from its log-probs,
/// and its prefix cache keeping the agent's growing prompt decoded, across questions too.
#[test]
fn the_agent_runs_on_llama_server() {
    let _model = common::one_model_at_a_time();
    let server = LlamaServer::start();
    let first = ask(
        &server.base,
        "Is the Atlantic Ocean larger than Lake Geneva?",
    );
    let second = ask(
        &server.base,
        "Could a llama give birth twice during the Vietnam War?",
    );
    for trace in [&first, &second] {
        assert!(trace["answer"].is_boolean(), "{trace}");
        let steps = trace["branches"][0]["steps"].as_array().unwrap();
        let sub_question = steps[0]["sub_question"].as_str().unwrap();
        assert!(sub_question.ends_with('?'), "{sub_question}");
        let actions = trace["branches"][0]["actions"].as_array().unwrap();
        for a in &actions[1..] {
            let prefilled = a["timing"]["prefilled"].as_u64().unwrap();
            assert!(prefilled < 100, "a step re-decoded {prefilled} tokens: {a}");
        }
    }
    // The second question's first request finds the system prompt in the server's cache.
    let opening = second["branches"][0]["actions"][0]["timing"]["prefilled"]
        .as_u64()
        .unwrap();
    assert!(
        opening < 100,
        "the system prompt was decoded again ({opening} tokens)"
    );
}
