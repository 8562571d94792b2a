//! `geek eval strategyqa` end to end on the real model: every method, resume after kill -9,
//! leaderboard predictions, dataset errors before any work.

mod common;

use std::path::{Path, PathBuf};

use common::{data_dir, model_path};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `geek` with the test model, data and `index`, plus `args`.
fn geek(index: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_geek"));
    cmd.args(args)
        .arg("--model")
        .arg(model_path())
        .arg("--data-dir")
        .arg(data_dir())
        .arg("--index")
        .arg(index)
        .env("GEEK_THREADS", "2")
        .env("GEEK_CALIBRATION", common::calibration_store());
    cmd
}

fn ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix));
    v
}

fn samples(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn built_index(dir: &Path) -> PathBuf {
    let index = dir.join("index");
    ok(geek(&index, &["index", "build"]));
    index
}

#[test]
fn every_method_answers_the_first_ten_dev_questions() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = built_index(dir.path());
    let out = dir.path().join("runs");
    for method in ["direct", "cot", "rag", "geek"] {
        let stdout = ok(geek(
            &index,
            &[
                "eval",
                "strategyqa",
                "--split",
                "dev",
                "--method",
                method,
                "--limit",
                "10",
                "--parallel",
                "2",
                "--out",
                out.to_str().unwrap(),
            ],
        ));
        assert!(stdout.contains("accuracy"), "{stdout}");
        let results = files(&out, &format!("results_{method}_"));
        assert_eq!(results.len(), 1);
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&results[0]).unwrap()).unwrap();
        let m = &r["results"]["strategyqa"];
        assert_eq!(m["n"], 10);
        assert_eq!(m["errors"], 0);
        let acc = m["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(m["acc_stderr"].as_f64().unwrap() > 0.0);
        assert_eq!(r["config"]["method"], method);
        assert_eq!(
            r["config"]["model_sha256"],
            geek_backend::catalog::test_model().sha256
        );
        let s = samples(&files(&out, &format!("samples_{method}_"))[0]);
        assert_eq!(s.len(), 10);
        match method {
            "geek" => {
                assert!(s.iter().all(|x| x["trace"]["version"] == 1));
                assert!(m["mean_steps"].as_f64().is_some());
            }
            "rag" => assert!(m["recall@10"].as_f64().unwrap() > 0.5),
            "cot" => assert!(s.iter().all(|x| x["reasoning"].is_string())),
            _ => assert!(m["recall@10"].is_null()),
        }
    }
    let report = ok(geek(&index, &["eval", "report", out.to_str().unwrap()]));
    for method in ["direct", "cot", "rag", "geek"] {
        assert!(
            report.contains(&format!("| {method} | dev | 10 |")),
            "{report}"
        );
    }
    for png in [
        "accuracy.png",
        "steps_histogram.png",
        "accuracy_vs_steps.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5000, "{png}");
    }
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("![accuracy](accuracy.png)"));
}

#[test]
fn a_killed_run_resumes_with_every_question_exactly_once() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("no-index");
    let out = dir.path().join("runs");
    let args = [
        "eval",
        "strategyqa",
        "--split",
        "dev",
        "--method",
        "cot",
        "--limit",
        "12",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut child = geek(&index, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let written = files(&out, "samples_cot_").first().map_or(0, |p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count()
        });
        if written >= 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the run wrote no three samples in ten minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = samples(&files(&out, "samples_cot_")[0]).len();
    assert!(before < 12, "killed too late to test resuming");

    ok(geek(&index, &args));
    let sample_files = files(&out, "samples_cot_");
    assert_eq!(
        sample_files.len(),
        1,
        "the rerun must continue the same run"
    );
    let all = samples(&sample_files[0]);
    let mut indices: Vec<u64> = all.iter().map(|s| s["index"].as_u64().unwrap()).collect();
    indices.sort();
    assert_eq!(indices, (0..12).collect::<Vec<u64>>());
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files(&out, "results_cot_")[0]).unwrap()).unwrap();
    assert_eq!(r["results"]["strategyqa"]["n"], 12);
}

#[test]
fn the_test_split_writes_leaderboard_predictions() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    ok(geek(
        &dir.path().join("none"),
        &[
            "eval",
            "strategyqa",
            "--split",
            "test",
            "--method",
            "direct",
            "--limit",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    let preds: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&files(&out, "predictions_direct_")[0]).unwrap())
            .unwrap();
    assert_eq!(preds.len(), 3);
    assert!(preds.values().all(|v| v.is_boolean()));
}

#[test]
fn a_malformed_dataset_stops_the_run_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"qid":"a","question":"ok?","answer":true},{"qid":"b","question":"?","answer":"maybe"}]"#).unwrap();
    let out = dir.path().join("runs");
    let res = geek(
        &dir.path().join("none"),
        &[
            "eval",
            "strategyqa",
            "--split",
            bad.to_str().unwrap(),
            "--method",
            "direct",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("question 2") && err.contains("qid b"), "{err}");
    assert!(files(&out, "samples_").is_empty(), "nothing may be written");
}
