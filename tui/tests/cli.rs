//! The `geek` binary end to end, on the real default model.

mod common;

use std::path::PathBuf;

use common::{data_dir, model_path};
use std::process::Command;

fn geek(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_geek"))
        .args(args)
        .env("GEEK_THREADS", "2")
        .env("GEEK_CALIBRATION", common::calibration_store())
        .output()
        .expect("geek runs")
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "geek failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn model_info_reads_the_gguf_metadata() {
    let model = model_path();
    let out = stdout_of(&geek(&["model", "info", model.to_str().unwrap(), "--json"]));
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["context_length"], 8192);
    assert_eq!(info["vocab_size"], 49152);
    let params = info["parameters"].as_u64().unwrap();
    assert!((130_000_000..140_000_000).contains(&params), "{params}");
    assert!(info["tensor_types"]["Q4_1"].as_u64().unwrap() > 100);
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
}

#[test]
fn generate_streams_a_deterministic_answer() {
    let _model = common::one_model_at_a_time();
    let model = model_path();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "24",
        "What is the capital of France?",
    ];
    let a = stdout_of(&geek(&args));
    let b = stdout_of(&geek(&args));
    assert_eq!(a, b);
    assert!(a.contains("Paris"), "{a}");
}

#[test]
fn generate_json_with_a_grammar() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let grammar = dir.path().join("yesno.gbnf");
    std::fs::write(&grammar, "root ::= (\"yes\" | \"no\") \".\"\n").unwrap();
    let model = model_path();
    let out = stdout_of(&geek(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--grammar",
        grammar.to_str().unwrap(),
        "Is the sky blue? Answer yes or no.",
    ]));
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = done["text"].as_str().unwrap();
    assert!(text == "yes." || text == "no.", "{text}");
    assert_eq!(done["stop"], "eos");
}

#[test]
fn bad_model_files_are_reported_not_crashed_on() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = geek(&["generate", "--model", junk.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt GGUF"), "{err}");
    let out = geek(&["model", "info", "no-such-model"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model"));
    // A LoRA is for the model in this process, not a server's: refused, not ignored.
    let out = geek(&[
        "ask",
        "--endpoint",
        "http://127.0.0.1:9",
        "--lora",
        junk.to_str().unwrap(),
        "Is water wet?",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lora") && err.contains("server"), "{err}");
}

#[test]
fn bench_backend_reports_every_test() {
    let _model = common::one_model_at_a_time();
    let model = model_path();
    let out = stdout_of(&geek(&[
        "bench",
        "backend",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--pp",
        "32",
        "--tg",
        "8",
        "--parallel",
        "1,2",
        "--batched-tokens",
        "8",
        "--repetitions",
        "1",
    ]));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = report["results"].as_array().unwrap();
    let names: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r["test"].as_str().unwrap().to_string(),
                r["parallel"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("pp32".into(), 1),
            ("tg8".into(), 1),
            ("batched-tg8".into(), 1),
            ("batched-tg8".into(), 2)
        ]
    );
    assert!(results
        .iter()
        .all(|r| r["tokens_per_second"].as_f64().unwrap() > 0.0));
}

#[test]
fn model_pull_fetches_and_verifies_the_test_model() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let pull = || {
        stdout_of(
            &Command::new(env!("CARGO_BIN_EXE_geek"))
                .args([
                    "model",
                    "pull",
                    "smollm2-135m-instruct-q4_1",
                    "--models-dir",
                    dir.path().to_str().unwrap(),
                ])
                .output()
                .unwrap(),
        )
    };
    let out = pull();
    let path = PathBuf::from(out.trim());
    assert_eq!(path, dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(
        geek_backend::catalog::sha256_file(&path).unwrap(),
        geek_backend::catalog::test_model().sha256
    );
    // Only the verified file (and the pull's lock) is left behind.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".pull.lock"))
        .collect();
    assert_eq!(left, vec!["SmolLM2-135M-Instruct.Q4_1.gguf"]);
    // A second pull finds it in place.
    assert_eq!(pull().trim(), out.trim());
}

#[test]
fn index_build_search_and_retrieval_eval() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let data = data_dir();
    let common = [
        "--data-dir",
        data.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend_from_slice(&common);
        stdout_of(&geek(&args))
    };
    assert!(run(&["index", "build"]).contains("indexed 19284 passages"));

    let hits: serde_json::Value = serde_json::from_str(&run(&[
        "search",
        "llama gestation period",
        "-k",
        "3",
        "--json",
    ]))
    .unwrap();
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().any(|h| h["title"] == "Llama"), "{hits:?}");
    // Query syntax in user text is just text.
    run(&["search", "title:(\"llama AND", "--json"]);

    let report: serde_json::Value = serde_json::from_str(&run(&[
        "eval",
        "retrieval",
        "--split",
        "dev",
        "--mode",
        "decomposition",
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["questions"], 229);
    assert!(report["recall"].as_f64().unwrap() >= 0.862, "{report}");

    // A missing index is a clear error.
    let out = geek(&[
        "search",
        "x",
        "--index",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("geek index build"));
}

#[test]
fn a_malformed_dataset_is_reported_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"qid":"a","question":"fine?"},{"qid":"b"}]"#).unwrap();
    let out = geek(&["eval", "retrieval", "--split", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("question 2") && err.contains("qid b"), "{err}");
}

#[test]
fn ask_prints_the_excavation_and_the_json_trace() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let data = data_dir();
    let model = model_path();
    let base = [
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
    ];
    fn with<'a>(extra: &[&'a str], base: &[&'a str]) -> Vec<&'a str> {
        extra.iter().chain(base).copied().collect()
    }
    stdout_of(&geek(&with(&["index", "build"], &base)));
    let q = "Could a llama give birth twice during the Vietnam War?";
    let text = stdout_of(&geek(&with(&["ask", q, "--max-steps", "4"], &base)));
    assert!(text.contains("Q: ") && text.contains("Answer: "), "{text}");
    let trace: serde_json::Value = serde_json::from_str(&stdout_of(&geek(&with(
        &["ask", q, "--max-steps", "4", "--json"],
        &base,
    ))))
    .unwrap();
    assert_eq!(trace["version"], 1);
    assert_eq!(trace["question"], q);
    assert!(trace["answer"].is_boolean());
    assert_eq!(trace["config"]["max_steps"], 4);
    assert!(trace["branches"][0]["actions"].as_array().unwrap().len() <= 5);
    // Without retrieval no index is needed.
    let out = stdout_of(&geek(&[
        "ask",
        q,
        "--no-retrieval",
        "--max-steps",
        "2",
        "--model",
        model.to_str().unwrap(),
        "--index",
        "/nonexistent",
    ]));
    assert!(out.contains("Answer: "));
}

#[test]
fn ppl_of_the_model_its_dequantized_and_its_requantized_copies() {
    let _model = common::one_model_at_a_time();
    let model = model_path();
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let f16 = dir.path().join("f16.gguf");
    stdout_of(&geek(&[
        "compress",
        "dequantize",
        "--model",
        model.to_str().unwrap(),
        "--type",
        "f16",
        "--out",
        f16.to_str().unwrap(),
    ]));
    let ppl = |m: &PathBuf| -> f64 {
        let out = stdout_of(&geek(&[
            "ppl",
            "--model",
            m.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--ctx",
            "256",
            "--chunks",
            "3",
            "--json",
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["chunks"], 3);
        assert_eq!(v["scored"], 3 * 127);
        v["ppl"].as_f64().unwrap()
    };
    let q4_0 = dir.path().join("q4_0.gguf");
    let out = stdout_of(&geek(&[
        "compress",
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--type",
        "q4_0",
        "--out",
        q4_0.to_str().unwrap(),
    ]));
    assert!(out.contains("210 q4_0, 1 q8_0"), "{out}");
    let (q4, f, rtn) = (ppl(&model), ppl(&f16), ppl(&q4_0));
    assert!((5.0..200.0).contains(&q4), "{q4}");
    // The f16 copy holds the same weights (the Q4_1 grid is exact in f16 up to rounding).
    assert!((q4 - f).abs() / q4 < 0.02, "{q4} vs {f}");
    // Requantizing to Q4_0 (no minimum per block) costs perplexity.
    assert!(rtn > f * 1.05, "{rtn} vs {f}");
    // The embedding's type is selectable, as in llama-quantize's mixes.
    let all_q4 = dir.path().join("all-q4_0.gguf");
    let out = stdout_of(&geek(&[
        "compress",
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--type",
        "q4_0",
        "--embedding-type",
        "q4_0",
        "--out",
        all_q4.to_str().unwrap(),
    ]));
    assert!(out.contains("(61 f32, 211 q4_0; 0 fell back)"), "{out}");
    assert!(ppl(&all_q4) > rtn, "a 4-bit embedding costs more");
    let bad = geek(&[
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "/nonexistent/text.raw",
    ]);
    assert!(!bad.status.success());
}

/// The catalogue's default model (Qwen2.5-Coder-1.5B, pulled by CI) answers end to end:
/// retrieval, excavation, calibrated final answer; a second start loads the saved system prompt.
#[test]
fn the_default_model_answers_a_question() {
    let _model = common::one_model_at_a_time();
    let default = geek_backend::paths::models_dir(None)
        .join(geek_backend::catalog::default_model().file_name);
    assert!(default.is_file(), "run `geek model pull` first");
    let info: serde_json::Value = serde_json::from_str(&stdout_of(&geek(&[
        "model",
        "info",
        default.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(info["architecture"], "qwen2");
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let data = data_dir();
    let base = [
        "--data-dir",
        data.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
    ];
    let mut build = vec!["index", "build"];
    build.extend(base);
    stdout_of(&geek(&build));
    let q = "Is the Atlantic Ocean larger than Lake Geneva?";
    let mut ask = vec!["ask", q, "--max-steps", "3", "--json"];
    ask.extend(base);
    let trace: serde_json::Value = serde_json::from_str(&stdout_of(&geek(&ask))).unwrap();
    assert!(trace["answer"].is_boolean());
    assert!(
        trace["model"].as_str().unwrap().contains("qwen2"),
        "{trace}"
    );
    assert!(trace["calibration"].is_string(), "{trace}");
    let again: serde_json::Value = serde_json::from_str(&stdout_of(&geek(&ask))).unwrap();
    assert_eq!(again["answer"], trace["answer"], "greedy and deterministic");
}

#[test]
fn bench_agent_breaks_the_time_down() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let data = data_dir();
    let model = model_path();
    let base = [
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
    ];
    let mut build = vec!["index", "build"];
    build.extend(base);
    stdout_of(&geek(&build));
    let mut bench = vec!["bench", "agent", "--limit", "2", "--json"];
    bench.extend(base);
    let report: serde_json::Value = serde_json::from_str(&stdout_of(&geek(&bench))).unwrap();
    assert_eq!(report["questions"].as_array().unwrap().len(), 2);
    let total = &report["total"];
    assert!(total["prefilled"].as_u64().unwrap() > 100);
    assert!(total["generated"].as_u64().unwrap() > 10);
    assert!(total["overhead"].as_f64().unwrap() > 0.5);
    let parts = [
        "prefill_seconds",
        "generation_seconds",
        "retrieval_seconds",
        "other_seconds",
    ]
    .map(|k| total[k].as_f64().unwrap());
    let wall = total["wall_seconds"].as_f64().unwrap();
    assert!(
        (parts.iter().sum::<f64>() - wall).abs() < 0.05 * wall + 0.05,
        "{total}"
    );
    assert!(report["by_action"]["final"]["count"].as_u64().unwrap() >= 2);
}

#[test]
fn calibration_is_fitted_on_train_questions_only() {
    let data = data_dir();
    let refused = geek(&[
        "eval",
        "calibrate",
        "--split",
        "dev",
        "--method",
        "direct",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("train only"), "{err}");
    // A file of dev questions is refused too, before any model is loaded.
    let dir = tempfile::tempdir().unwrap();
    let dev: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("strategyqa/dev.json")).unwrap()).unwrap();
    let file = dir.path().join("mine.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&dev.as_array().unwrap()[..3]).unwrap(),
    )
    .unwrap();
    let refused = geek(&[
        "eval",
        "calibrate",
        "--split",
        file.to_str().unwrap(),
        "--method",
        "direct",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not StrategyQA train questions"));
}

#[test]
fn dense_and_hybrid_search_over_an_embedded_index() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let passages = [
        (
            "Llama",
            "The llama is a South American camelid whose gestation lasts about 11.5 months.",
        ),
        (
            "Vietnam War",
            "The Vietnam War was fought from 1955 to 1975.",
        ),
        ("Paris", "Paris is the capital of France."),
        (
            "Everest",
            "Mount Everest is the highest mountain above sea level.",
        ),
    ];
    let lines: Vec<String> = passages
        .iter()
        .enumerate()
        .map(|(i, (t, x))| {
            serde_json::json!({"id": format!("p{i}"), "title": t, "text": x}).to_string()
        })
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let index = dir.path().join("index");
    let with_index = |extra: &[&str]| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend_from_slice(&["--index", index.to_str().unwrap()]);
        geek(&args)
    };
    // Dense search before embedding: refused, with the command that fixes it.
    stdout_of(&with_index(&[
        "index",
        "build",
        "--corpus",
        corpus.to_str().unwrap(),
    ]));
    let refused = with_index(&["search", "camel pregnancy", "--source", "dense"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("geek index embed"));
    let out = stdout_of(&with_index(&["index", "embed"]));
    assert!(out.contains("embedded 4 passages"), "{out}");
    // Rerun: nothing left to do.
    assert!(stdout_of(&with_index(&["index", "embed"])).contains("4 already done"));
    for (source, expected_source) in [("dense", "dense"), ("hybrid", "hybrid:")] {
        let hits: serde_json::Value = serde_json::from_str(&stdout_of(&with_index(&[
            "search",
            "How long is a camel-like animal pregnant?",
            "--source",
            source,
            "-k",
            "2",
            "--json",
        ])))
        .unwrap();
        assert_eq!(hits[0]["title"], "Llama", "{source}: {hits}");
        assert!(hits[0]["source"]
            .as_str()
            .unwrap()
            .starts_with(expected_source));
    }
}

#[test]
fn wid_compresses_the_encoder_into_a_student_that_dense_search_loads() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir();
    let paragraphs = data.join("strategyqa/strategyqa_train_paragraphs.json");
    let index = dir.path().join("index");
    let student = dir.path().join("student");
    let global = |extra: &[&str], index: &std::path::Path| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend_from_slice(&["--index", index.to_str().unwrap()]);
        args.extend_from_slice(&["--data-dir", data.to_str().unwrap()]);
        geek(&args)
    };
    // Train evidence pairs need their paragraphs' text: an index of the StrategyQA paragraphs.
    stdout_of(&global(
        &["index", "build", "--corpus", paragraphs.to_str().unwrap()],
        &index,
    ));
    let out = stdout_of(&global(
        &[
            "compress",
            "wid",
            "--steps",
            "3",
            "--batch",
            "4",
            "--holdout",
            "32",
            "--max-tokens",
            "24",
            "--eval-every",
            "0",
            "--out",
            student.to_str().unwrap(),
        ],
        &index,
    ));
    assert!(
        out.contains("Wid student: 10646784 -> 3260544 layer parameters"),
        "{out}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("wid.json")).unwrap()).unwrap();
    assert!(
        report["fold_max_error"].as_f64().unwrap() < 1e-4,
        "{report}"
    );
    assert!(
        !student.join("checkpoint").exists(),
        "the finished run's checkpoint is removed"
    );

    // The student is an encoder like any other: a small index embedded and searched with it.
    let corpus = dir.path().join("corpus.jsonl");
    let lines = [
        r#"{"id":"a","title":"Llama","text":"The llama is a South American camelid; gestation lasts 11.5 months."}"#,
        r#"{"id":"b","title":"Paris","text":"Paris is the capital of France."}"#,
    ];
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let small = dir.path().join("small");
    stdout_of(&global(
        &["index", "build", "--corpus", corpus.to_str().unwrap()],
        &small,
    ));
    let encoder = ["--encoder", student.to_str().unwrap()];
    let out = stdout_of(&global(
        &[&["index", "embed"][..], &encoder].concat(),
        &small,
    ));
    assert!(
        out.contains("embedded 2 passages") && out.contains("dense-student"),
        "{out}"
    );
    let hits: serde_json::Value = serde_json::from_str(&stdout_of(&global(
        &[
            &[
                "search",
                "capital of France",
                "--source",
                "dense",
                "-k",
                "1",
                "--json",
            ][..],
            &encoder,
        ]
        .concat(),
        &small,
    )))
    .unwrap();
    assert_eq!(hits[0]["title"], "Paris", "{hits}");
}
