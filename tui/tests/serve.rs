//! `geek serve` on loopback with the real test model, driven by clients nobody here wrote:
//! `curl` and the official `openai` Python package.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::model_path;
use common::server::Server;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Waits until `probe` holds, for at most `secs` seconds.
fn eventually(secs: u64, mut probe: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if probe() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

const OPENAI_CLIENT: &str = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "What is the capital of France?"}]
whole = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=3)
streamed = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                          temperature=0, stream=True)
text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
legacy = client.completions.create(model="m", prompt="One, two, three,", max_tokens=6,
                                   temperature=0, stop=["\n"])
print(json.dumps({
    "whole": whole.choices[0].message.content,
    "streamed": text,
    "tokens": len(whole.choices[0].logprobs.content),
    "top": len(whole.choices[0].logprobs.content[0].top_logprobs),
    "usage": whole.usage.completion_tokens,
    "legacy": legacy.choices[0].text,
    "models": [m.id for m in client.models.list().data],
}))
"#;

#[test]
fn openai_clients_get_the_in_process_answers() {
    let _model = common::one_model_at_a_time();
    let server = Server::start(&[]);
    let (status, _, body) = server.curl("/health", &[]);
    assert_eq!(status, 200, "{body}");

    // Greedy decoding over HTTP gives what `geek generate` gives in process.
    let prompt = "The three primary colours are";
    let (status, _, body) = server.post(
        "/v1/completions",
        &serde_json::json!({"prompt": prompt, "max_tokens": 20, "temperature": 0}).to_string(),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let served = json(&body)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let model = model_path();
    let local = Command::new(env!("CARGO_BIN_EXE_geek"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "generate",
            "--raw",
            "--json",
        ])
        .args(["--max-tokens", "20", prompt])
        .env("GEEK_THREADS", "2")
        .output()
        .unwrap();
    assert!(local.status.success());
    let local = json(&String::from_utf8_lossy(&local.stdout));
    assert_eq!(served, local["text"].as_str().unwrap());

    // llama-server's own /completion (what geek's remote backend calls): greedy text, the
    // generated ids, why it stopped, and the prompt the previous request left cached (the
    // previous prompt and answer, continued).
    let native = serde_json::json!({"prompt": format!("{prompt}{served}"), "n_predict": 20,
        "temperature": 0, "return_tokens": true, "n_probs": 2, "cache_prompt": true});
    let (status, _, body) = server.post("/completion", &native.to_string(), &[]);
    assert_eq!(status, 200, "{body}");
    let native = json(&body);
    assert!(!native["content"].as_str().unwrap().is_empty());
    assert_eq!(
        native["tokens"].as_array().unwrap().len(),
        native["tokens_predicted"].as_u64().unwrap() as usize
    );
    assert!(["eos", "limit"].contains(&native["stop_type"].as_str().unwrap()));
    assert!(native["timings"]["cache_n"].as_u64().unwrap() > 0, "{body}");
    let probs = native["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let stopped = serde_json::json!({"prompt": prompt, "n_predict": 20, "temperature": 0,
        "stop": [served.trim_start().split(' ').nth(1).unwrap()]});
    let (_, _, body) = server.post("/completion", &stopped.to_string(), &[]);
    assert_eq!(json(&body)["stop_type"], "word", "{body}");

    let out = Command::new("python3")
        .args(["-c", OPENAI_CLIENT, &server.base])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the openai client failed (scripts/install-deps.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = json(&String::from_utf8_lossy(&out.stdout));
    assert!(!seen["whole"].as_str().unwrap().is_empty());
    assert_eq!(
        seen["whole"], seen["streamed"],
        "streaming changed the answer"
    );
    assert_eq!(seen["tokens"], seen["usage"]);
    assert_eq!(seen["top"], 3);
    assert!(!seen["legacy"].as_str().unwrap().contains('\n'));
    assert_eq!(seen["models"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_requests_get_typed_errors_and_the_agent_answers() {
    let _model = common::one_model_at_a_time();
    let server = Server::start(&["--max-body", "4096"]);
    for (body, want) in [
        ("{not json", 400),
        (r#"{"prompt": "x", "n": 2}"#, 400),
        (r#"{"prompt": "x", "max_tokens": 1000000}"#, 400),
        (r#"{"prompt": ""}"#, 400),
    ] {
        let (status, _, text) = server.post("/v1/completions", body, &[]);
        assert_eq!(status, want, "{body}: {text}");
        assert!(json(&text)["error"]["message"].is_string(), "{text}");
    }
    let big = serde_json::json!({"prompt": "word ".repeat(2000)}).to_string();
    let (status, _, _) = server.post("/v1/completions", &big, &[]);
    assert_eq!(status, 413, "a body over --max-body is refused");
    let (status, _, text) = server.post(
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "hi"}], "grammar": "root ::= ("}"#,
        &[],
    );
    assert_eq!(status, 400, "{text}");

    // The excavation: one JSON trace, or its events as they happen, ending with the trace.
    let question =
        r#"{"question": "Is the Atlantic Ocean larger than Lake Geneva?", "max_steps": 3}"#;
    let (status, _, text) = server.post("/v1/ask", question, &[]);
    assert_eq!(status, 200, "{text}");
    let trace = json(&text);
    assert!(trace["answer"].is_boolean());
    assert!(!trace["branches"][0]["actions"]
        .as_array()
        .unwrap()
        .is_empty());
    let stream = question.replace('}', r#", "stream": true}"#);
    let (status, _, text) = server.post("/v1/ask", &stream, &["-N"]);
    assert_eq!(status, 200);
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert!(events.contains(&"sub_question"), "{events:?}");
    assert_eq!(events.last(), Some(&"trace"), "{events:?}");
    let (status, _, _) = server.post("/v1/ask", r#"{"question": "x?", "explore": 99}"#, &[]);
    assert_eq!(status, 400);
}

#[test]
fn keys_queue_disconnects_and_shutdown_are_safe() {
    let _model = common::one_model_at_a_time();
    let key = ["-H", "authorization: Bearer s3cret"];
    let mut server = Server::start(&["--api-key", "s3cret", "--parallel", "1", "--queue", "0"]);
    let hello = r#"{"prompt": "Hello", "max_tokens": 4, "temperature": 0}"#;
    assert_eq!(server.post("/v1/completions", hello, &[]).0, 401);
    let wrong = ["-H", "authorization: Bearer s3creT"];
    assert_eq!(server.post("/v1/completions", hello, &wrong).0, 401);
    assert_eq!(server.curl("/health", &[]).0, 200, "health needs no key");
    assert_eq!(server.post("/v1/completions", hello, &key).0, 200);

    // One request runs (its grammar makes it long: one letter and a space at a time, far more
    // tokens than the checks below take; it is cancelled before it ends); the queue holds none,
    // so the next is told to come back.
    let long = r#"{"prompt": "Letters:", "max_tokens": 2048, "temperature": 0, "stream": true,
                   "grammar": "root ::= ([a-z] \" \"){1000}"}"#;
    let base = server.base.clone();
    let mut streaming = Command::new("curl")
        .args([
            "-sN",
            "-H",
            "content-type: application/json",
            "-H",
            key[1],
            "-d",
            long,
        ])
        .arg(format!("{base}/v1/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader stays open until the client is killed: closing the pipe would end curl (its
    // next write fails) and so cancel the stream before the next request is refused.
    let mut events = BufReader::new(streaming.stdout.take().unwrap());
    let mut first = String::new();
    events.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let (status, headers, body) = server.post("/v1/completions", hello, &key);
    assert_eq!(status, 503, "{body}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 1"),
        "{headers}"
    );
    // The client goes away: its generation is cancelled and its sequence freed (what stays
    // alive is the prompt cache's: the finished first request's).
    let _ = streaming.kill();
    let _ = streaming.wait();
    drop(events);
    assert!(
        eventually(10, || server.metric("geek_cancelled_total", &key) == 1.0
            && server.metric("geek_live_sequences", &key)
                == server.metric("geek_cached_sequences", &key)),
        "the disconnected stream still holds the engine"
    );
    assert_eq!(server.metric("geek_rejected_total", &key), 1.0);

    // SIGTERM while a request runs: it is answered in full, then the server exits cleanly.
    let body = r#"{"prompt": "Count:", "max_tokens": 200, "temperature": 0,
                   "grammar": "root ::= [a-z]{200}"}"#;
    let running = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
        ])
        .args(["-H", key[1], "-d", body])
        .arg(format!("{base}/v1/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(10, || {
        let (_, _, h) = server.curl("/health", &[]);
        json(&h)["running"] == 1
    }));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = running.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{text}");
    let generated = json(body)["choices"][0]["text"].as_str().unwrap().len();
    assert_eq!(generated, 200, "the in-flight request was cut short");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `geek ask` and `geek eval` with the model behind `geek serve`: the remote backend talks to
/// it over HTTP and the server's prompt cache keeps the agent's growing prompt decoded.
#[test]
fn the_agent_runs_on_a_model_server() {
    let _model = common::one_model_at_a_time();
    let server = Server::start(&[]);
    let question = "Is the Atlantic Ocean larger than Lake Geneva?";
    let model = model_path();
    let ask = |remote: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_geek"));
        if remote {
            cmd.args(["ask", "--endpoint", &server.base]);
        } else {
            cmd.args(["--model", model.to_str().unwrap(), "ask"]);
        }
        cmd.args([
            "--no-retrieval",
            "--no-calibration",
            "--json",
            "--max-steps",
            "4",
        ])
        .arg(question)
        .env("GEEK_THREADS", "2")
        .env("GEEK_CALIBRATION", common::calibration_store());
        common::json_output(&mut cmd)
    };
    let remote = ask(true);
    let local = ask(false);
    assert!(
        remote["model"].as_str().unwrap().contains(&server.base),
        "{}",
        remote["model"]
    );
    for trace in [&remote, &local] {
        let first = trace["branches"][0]["steps"][0]["sub_question"]
            .as_str()
            .unwrap();
        assert!(first.ends_with('?'), "{first}");
        assert!(trace["answer"].is_boolean());
    }
    let actions = remote["branches"][0]["actions"].as_array().unwrap();
    // After the first request (which decodes the system prompt), each step sends only what
    // is new: the server's cache holds the rest.
    for a in &actions[1..] {
        let prefilled = a["timing"]["prefilled"].as_u64().unwrap();
        assert!(prefilled < 100, "step re-decoded {prefilled} tokens: {a}");
    }

    // A batch evaluation over HTTP spread over two servers, resumable like any other.
    let other = Server::start(&[]);
    let before = answered(&server);
    let out_dir = tempfile::tempdir().unwrap();
    let eval = || {
        Command::new(env!("CARGO_BIN_EXE_geek"))
            .args(["eval", "strategyqa", "--method", "direct", "--limit", "4"])
            .args([
                "--endpoint",
                &server.base,
                "--endpoint",
                &other.base,
                "--out",
            ])
            .arg(out_dir.path())
            .env("GEEK_CALIBRATION", common::calibration_store())
            .env("GEEK_DATA_DIR", common::data_dir())
            .output()
            .unwrap()
    };
    let out = eval();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = eval();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("samples_"))
        .collect();
    assert_eq!(samples.len(), 1, "the rerun resumed the same run");
    let lines = std::fs::read_to_string(samples[0].path()).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(
        answered(&server) > before,
        "the first server got no question"
    );
    assert!(answered(&other) > 0.0, "the second server got no question");
}

/// Generation requests a server has answered.
fn answered(server: &Server) -> f64 {
    let (_, _, body) = server.curl("/metrics", &[]);
    body.lines()
        .filter(|l| l.starts_with("geek_requests_total{endpoint=\"completion\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
