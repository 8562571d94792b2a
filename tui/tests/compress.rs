//! `geek data trajectories`, `geek compress finetune`, `export` and `pipeline` end to end on
//! the real model, and the exported models served by `geek generate`.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use geek_backend::gguf::GgufFile;

use common::server::Server;
use common::{data_dir, model_path};

/// `geek ARGS` on the test model, data and `index`.
fn geek_command(index: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_geek"));
    cmd.args(args)
        .arg("--model")
        .arg(model_path())
        .arg("--data-dir")
        .arg(data_dir())
        .arg("--index")
        .arg(index)
        .env("GEEK_THREADS", "2");
    cmd
}

fn geek(index: &Path, args: &[&str]) -> std::process::Output {
    geek_command(index, args).output().unwrap()
}

/// The model identity a one-question direct evaluation with `lora_args` records.
fn evaluated_model_sha(index: &Path, out: &Path, lora_args: &[&str]) -> String {
    let mut args = vec!["eval", "strategyqa", "--method", "direct", "--limit", "1"];
    args.extend_from_slice(lora_args);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    ok(geek(index, &args));
    let results = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("results_"))
        .expect("a results file");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.path()).unwrap()).unwrap();
    results["config"]["model_sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `geek generate` on `model` writes some text.
fn assert_generates_text(model: &Path) {
    let text = ok(Command::new(env!("CARGO_BIN_EXE_geek"))
        .args(["generate", "--max-tokens", "8", "The capital of France is"])
        .arg("--model")
        .arg(model)
        .env("GEEK_THREADS", "2")
        .output()
        .unwrap());
    assert!(!text.trim().is_empty());
}

/// The lines of a JSONL file.
fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn trajectories_finetune_export_and_serve() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    ok(geek(&index, &["index", "build"]));
    let traj = dir.path().join("traj.jsonl");
    let t = traj.to_str().unwrap();

    // Dev questions never become training data.
    let refused = geek(
        &index,
        &["data", "trajectories", "--split", "dev", "--out", t],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("dev"));

    let out = ok(geek(
        &index,
        &["data", "trajectories", "--limit", "12", "--out", t],
    ));
    assert!(out.contains("trajectories"), "{out}");
    let lines = jsonl(&traj);
    assert!(lines.len() >= 10, "{}", lines.len());
    for l in &lines {
        let c = l["completion"].as_str().unwrap();
        assert!(c.starts_with("Action: AddDecomp\nSub-question 1:"), "{c}");
        // What the agent writes itself (prefixes, passages) is marked as context.
        let context = l["context"].as_array().unwrap();
        assert_eq!(context[0], serde_json::json!([0, "Action:".len()]));
        assert!(
            c.ends_with("Answer: yes") || c.ends_with("Answer: no"),
            "{c}"
        );
        assert!(l["prompt"].as_str().unwrap().contains("Question: "));
    }
    final_answers_train_a_top_layers_adapter(&index, dir.path());
    the_pipeline_quantizes_what_the_adapter_changed(&index, dir.path());

    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let train = |steps: &str| {
        geek(
            &index,
            &[
                "compress",
                "finetune",
                "--data",
                t,
                "--out",
                r,
                "--adapter",
                "moslora",
                "--rank",
                "4",
                "--steps",
                steps,
                "--batch",
                "1",
                "--accumulation",
                "1",
                "--seq-len",
                "384",
                "--holdout",
                "2",
                "--limit",
                "6",
                "--checkpoint-every",
                "1",
                "--lr",
                "1e-3",
            ],
        )
    };
    ok(train("1"));
    // A second call with more steps resumes from the checkpoint.
    let out = ok(train("2"));
    assert!(out.contains("moslora") && out.contains("2 steps"), "{out}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["history"].as_array().unwrap().len(), 2);
    assert!(summary["heldout_loss"].as_f64().unwrap().is_finite());
    assert!(std::fs::read(run.join("loss.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));

    let merged = dir.path().join("merged.gguf");
    let lora = dir.path().join("lora.gguf");
    let adapter = run.join("adapter");
    ok(geek(
        &index,
        &[
            "compress",
            "export",
            "--adapter-dir",
            adapter.to_str().unwrap(),
            "--merged",
            merged.to_str().unwrap(),
            "--gguf-lora",
            lora.to_str().unwrap(),
        ],
    ));
    let info = ok(Command::new(env!("CARGO_BIN_EXE_geek"))
        .args(["model", "info"])
        .arg(&merged)
        .output()
        .unwrap());
    assert!(info.contains("llama"), "{info}");
    assert_generates_text(&merged);

    // The exported GGUF LoRA, unmerged, at run time: at scale 0 the base model's text; a
    // file that is not a LoRA is a clear error; an evaluation with it records its own model.
    let generate = |lora: Option<String>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_geek"));
        cmd.args(["generate", "--max-tokens", "12", "The capital of France is"])
            .arg("--model")
            .arg(model_path())
            .env("GEEK_THREADS", "2");
        if let Some(lora) = lora {
            cmd.args(["--lora", &lora]);
        }
        cmd.output().unwrap()
    };
    let lora_arg = lora.to_str().unwrap().to_string();
    assert_eq!(
        ok(generate(Some(format!("{lora_arg}:0")))),
        ok(generate(None))
    );
    let refused = generate(Some(traj.to_str().unwrap().to_string()));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--lora"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let sha = evaluated_model_sha(&index, &dir.path().join("evals"), &["--lora", &lora_arg]);
    assert!(sha.contains("+lora:") && sha.ends_with("@1"), "{sha}");
    saved_system_prompts_are_keyed_by_the_lora(&index, dir.path(), &lora_arg);
    answers_alone_run_on_the_adapter(&index, dir.path(), &lora_arg);
    served_requests_choose_their_adapter(&lora_arg);

    // The same data through the one-command pipeline: finetune → merge → learned Q4_0.
    let quantized = dir.path().join("pipeline-q4_0.gguf");
    let summary = dir.path().join("quant.json");
    let out = ok(geek(
        &index,
        &[
            "compress",
            "pipeline",
            "--data",
            t,
            "--adapter",
            "lora",
            "--rank",
            "4",
            "--type",
            "q4_0",
            "--out",
            quantized.to_str().unwrap(),
            "--finetune-steps",
            "1",
            "--finetune-seq-len",
            "384",
            "--accumulation",
            "1",
            "--holdout",
            "2",
            "--limit",
            "6",
            "--steps",
            "1",
            "--calib-rows",
            "6",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--summary",
            summary.to_str().unwrap(),
        ],
    ));
    assert!(
        out.contains("q4_0, learned") && out.contains("210 q4_0"),
        "{out}"
    );
    let learned: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert!(learned["learn"]["final_kl"].as_f64().unwrap().is_finite());
    assert!(quantized.with_extension("work").join("adapter").is_dir());
    let info = ok(Command::new(env!("CARGO_BIN_EXE_geek"))
        .args(["model", "info"])
        .arg(&quantized)
        .output()
        .unwrap());
    assert!(info.contains("q4_0") || info.contains("Q4_0"), "{info}");
    assert_generates_text(&quantized);
}

/// `geek compress prune` on the real model: a size written (f32 and q4_0) that `geek generate`
/// serves, a rerun that reads the finished size back instead of redoing it, and `pipeline
/// --prune` chaining learned pruning into quantization.
#[test]
fn prune_writes_sizes_the_backend_serves_and_the_pipeline_chains_it() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("no-index");
    let out_dir = dir.path().join("pruned");
    let small = ["--calib-rows", "6", "--seq-len", "32", "--batch", "2"];
    let prune_into = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "compress",
            "prune",
            "--keep",
            "0.75",
            "--method",
            "magnitude",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        geek(&index, &args)
    };
    let prune = |extra: &[&str]| {
        prune_into(
            &out_dir,
            &[&["--type", "q4_0", "--recover-steps", "1"], extra].concat(),
        )
    };
    let out = ok(prune(&[]));
    assert!(
        out.contains("keep 0.75:") && out.contains("% of non-embedding"),
        "{out}"
    );
    let f32_file = out_dir.join("keep-0.75.gguf");
    let q4 = out_dir.join("keep-0.75-q4_0.gguf");
    assert!(f32_file.is_file() && q4.is_file());
    let info = ok(Command::new(env!("CARGO_BIN_EXE_geek"))
        .args(["model", "info"])
        .arg(&q4)
        .output()
        .unwrap());
    assert!(info.contains("deci"), "{info}");
    // Served (what it says after one recovery step is not the point).
    ok(Command::new(env!("CARGO_BIN_EXE_geek"))
        .args(["generate", "--max-tokens", "6", "The capital of France is"])
        .arg("--model")
        .arg(&q4)
        .env("GEEK_THREADS", "2")
        .output()
        .unwrap());
    // A rerun finds the size done; other settings in the same directory are refused.
    let again = ok(prune(&[]));
    assert_eq!(again.lines().next(), out.lines().next(), "{again}");
    let other = prune(&["--recover-lr", "1e-3"]);
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("other pruning settings"));

    // No recovery steps: the extracted model written as it is, its held-out KL measured.
    let bare = dir.path().join("bare");
    ok(prune_into(&bare, &["--recover-steps", "0"]));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bare.join("keep-0.75.json")).unwrap()).unwrap();
    let kl = &summary["recovered"];
    assert!(kl["initial_kl"].as_f64().unwrap() > 0.0, "{summary}");
    assert_eq!(kl["initial_kl"], kl["final_kl"], "{summary}");
    assert!(bare.join("keep-0.75.gguf").is_file());
    // Low-rank recovery: its rank is part of the size's settings.
    let low_rank = dir.path().join("low-rank");
    ok(prune_into(
        &low_rank,
        &[
            "--recover-steps",
            "1",
            "--recover-rank",
            "4",
            "--recover-lr",
            "1e-3",
        ],
    ));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(low_rank.join("keep-0.75.json")).unwrap()).unwrap();
    assert_eq!(summary["settings"]["recover"]["lora_rank"], 4, "{summary}");
    assert!(low_rank.join("keep-0.75.gguf").is_file());

    // learned masks → recovery → rtn q4_0 in one command.
    let chained = dir.path().join("pruned-q4_0.gguf");
    let mut args = vec![
        "compress",
        "pipeline",
        "--prune",
        "0.75",
        "--prune-steps",
        "2",
        "--type",
        "q4_0",
        "--method",
        "rtn",
        "--out",
        chained.to_str().unwrap(),
        "--recover-steps",
        "1",
    ];
    args.extend_from_slice(&small);
    let out = ok(geek(&index, &args));
    assert!(
        out.contains("q4_0, rtn") && out.contains("keep-0.75.gguf"),
        "{out}"
    );
    assert!(chained.is_file());
    assert!(chained
        .with_extension("work")
        .join("prune/masks.json")
        .is_file());
}

/// `--render final-answer` writes the final answer's own prompt with the gold facts, completed
/// by " yes" or " no"; a top-layers adapter trains on it and keeps the lower layers' streams on
/// disk, which a resumed run reads back.
fn final_answers_train_a_top_layers_adapter(index: &Path, dir: &Path) {
    let data = dir.join("final.jsonl");
    let f = data.to_str().unwrap();
    let args = [
        "data",
        "trajectories",
        "--render",
        "final-answer",
        "--limit",
        "12",
    ];
    ok(geek(index, &[&args[..], &["--out", f]].concat()));
    let lines = jsonl(&data);
    assert!(lines.len() >= 10, "{}", lines.len());
    for l in &lines {
        let (p, c) = (
            l["prompt"].as_str().unwrap(),
            l["completion"].as_str().unwrap(),
        );
        assert!(p.contains("Facts:\n- ") && p.ends_with("Answer:"), "{p}");
        assert!(c == " yes" || c == " no", "{c}");
    }
    let out = dir.join("final-run");
    let o = out.to_str().unwrap();
    let train = |steps: &str| {
        let args = [
            "compress",
            "finetune",
            "--data",
            f,
            "--out",
            o,
            "--top-layers",
            "2",
            "--steps",
            steps,
            "--batch",
            "2",
            "--accumulation",
            "1",
            "--seq-len",
            "256",
            "--holdout",
            "2",
            "--checkpoint-every",
            "1",
        ];
        ok(geek(index, &args))
    };
    let first = train("1");
    assert!(first.contains("lower layers' streams kept"), "{first}");
    let streams = |d: &Path| -> usize {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| std::fs::read_dir(e.unwrap().path()).unwrap().count())
            .sum()
    };
    let written = streams(&out.join("lower-streams"));
    assert!(written >= 4, "{written}");
    let second = train("2");
    assert!(second.contains("2 steps"), "{second}");
    assert!(streams(&out.join("lower-streams")) >= written);
}

/// `pipeline --keep-base`: an adapter on the top layer, merged; its seven matrices written in
/// q8_0 and every other tensor copied from the base file byte for byte, a model the backend
/// serves. Stages that cannot go with it are refused before any training.
fn the_pipeline_quantizes_what_the_adapter_changed(index: &Path, dir: &Path) {
    let (data, out) = (dir.join("final.jsonl"), dir.join("keep-base.gguf"));
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "compress",
            "pipeline",
            "--data",
            d,
            "--top-layers",
            "1",
            "--rank",
            "4",
            "--finetune-steps",
            "1",
            "--finetune-seq-len",
            "256",
            "--accumulation",
            "1",
            "--holdout",
            "2",
            "--type",
            "q8_0",
            "--keep-base",
            "--out",
            o,
        ];
        a.extend_from_slice(extra);
        a
    };
    for (extra, why) in [
        (&["--method", "learned"][..], "--method rtn"),
        (&["--method", "rtn", "--prune", "0.75"][..], "pruning"),
        // q8_0 has no llama-quantize mix: refused before the finetune, not after it.
        (&["--method", "rtn", "--medium"][..], "the mixes are"),
    ] {
        let refused = geek(index, &args(extra));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(why),
            "{stderr}"
        );
        assert!(!out.with_extension("work").exists());
    }
    let printed = ok(geek(index, &args(&["--method", "rtn"])));
    // SmolLM2's file: 210 q4_1 matrices and a q8_0 embedding; seven of the matrices changed.
    assert!(printed.contains("203 q4_1, 8 q8_0"), "{printed}");

    let (base, written) = (
        GgufFile::open(model_path()).unwrap(),
        GgufFile::open(&out).unwrap(),
    );
    let top = format!("blk.{}.", base.get_u64("llama.block_count").unwrap() - 1);
    assert_eq!(base.tensors.len(), written.tensors.len());
    for t in &written.tensors {
        let b = base.tensors.iter().find(|b| b.name == t.name).unwrap();
        assert_eq!(t.dims, b.dims, "{}", t.name);
        let changed = t.name.starts_with(&top) && t.dims.len() == 2;
        if changed {
            assert_eq!(t.type_name(), "Q8_0", "{}", t.name);
        } else {
            assert_eq!(t.type_id, b.type_id, "{}", t.name);
            assert!(
                tensor_bytes(&written, &t.name) == tensor_bytes(&base, &t.name),
                "{}",
                t.name
            );
        }
    }
    assert_generates_text(&out);
}

/// The stored bytes of tensor `name`.
fn tensor_bytes(file: &GgufFile, name: &str) -> Vec<u8> {
    let t = file.tensors.iter().find(|t| t.name == name).unwrap();
    let mut bytes = vec![0; t.n_bytes().unwrap() as usize];
    let mut f = std::fs::File::open(&file.path).unwrap();
    f.seek(SeekFrom::Start(file.data_offset + t.offset))
        .unwrap();
    f.read_exact(&mut bytes).unwrap();
    bytes
}

/// The agent saves its decoded system prompt per model: the base model, a LoRA and the same
/// LoRA at another scale compute different KV states, so each gets a file of its own.
fn saved_system_prompts_are_keyed_by_the_lora(index: &Path, dir: &Path, lora: &str) {
    let cache = dir.join("xdg-cache");
    let ask = |lora: Option<String>| {
        let mut cmd = geek_command(index, &["ask", "Is water wet?", "--max-steps", "1"]);
        cmd.env("XDG_CACHE_HOME", &cache);
        if let Some(lora) = lora {
            cmd.args(["--lora", &lora]);
        }
        ok(cmd.output().unwrap());
    };
    ask(None);
    ask(Some(lora.to_string()));
    ask(Some(format!("{lora}:0.5")));
    ask(Some(lora.to_string()));
    let saved = std::fs::read_dir(cache.join("geek").join("kv"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("prefix-")
        })
        .count();
    assert_eq!(saved, 3);
}

/// `--lora-scope answer`: the excavation runs on the base weights (the same steps as without
/// the adapter), the final answer on the adapter (other scores); runs record their own model.
fn answers_alone_run_on_the_adapter(index: &Path, dir: &Path, lora: &str) {
    let ask = |args: &[&str]| -> serde_json::Value {
        let mut cmd = geek_command(index, &["ask", "Is water wet?", "--max-steps", "2"]);
        cmd.args(["--json", "--no-calibration"])
            .args(args)
            .env("XDG_CACHE_HOME", dir.join("xdg-cache"));
        serde_json::from_str(&ok(cmd.output().unwrap())).unwrap()
    };
    // A large scale, so the briefly trained adapter moves the answer's scores.
    let scaled = format!("{lora}:8");
    let base = ask(&[]);
    let answer = ask(&["--lora", &scaled, "--lora-scope", "answer"]);
    let branch = |t: &serde_json::Value| t["branches"][0].clone();
    assert_eq!(branch(&answer)["steps"], branch(&base)["steps"]);
    let yes = |t: &serde_json::Value| branch(t)["final_answer"]["yes_logprob"].as_f64().unwrap();
    assert!(
        (yes(&answer) - yes(&base)).abs() > 1e-3,
        "the answer did not run on the adapter: {} and {}",
        yes(&answer),
        yes(&base)
    );
    assert!(
        answer["model"]
            .as_str()
            .unwrap()
            .contains("answering on LoRA"),
        "{}",
        answer["model"]
    );
    let sha = evaluated_model_sha(
        index,
        &dir.join("evals-answer"),
        &["--lora", &scaled, "--lora-scope", "answer"],
    );
    assert!(
        sha.contains("+answer-lora:") && !sha.contains("+lora:") && sha.ends_with("@8"),
        "{sha}"
    );
}

/// `geek serve --lora`: a request's `lora` field (llama-server's) picks its weights — the
/// server's adapter when absent, the base model when empty or at scale 0 — and the prompt
/// cache never continues a sequence decoded on other weights.
fn served_requests_choose_their_adapter(lora: &str) {
    let server = Server::start(&["--lora", &format!("{lora}:8")]);
    let complete = |lora: Option<serde_json::Value>| -> (u16, serde_json::Value) {
        let mut body = serde_json::json!({"prompt": "The capital of France is",
            "max_tokens": 1, "temperature": 0, "logprobs": 1});
        if let Some(lora) = lora {
            body["lora"] = lora;
        }
        let (status, _, body) = server.post("/v1/completions", &body.to_string(), &[]);
        (status, serde_json::from_str(&body).unwrap_or_default())
    };
    let first = |r: &serde_json::Value| {
        r["choices"][0]["logprobs"]["token_logprobs"][0]
            .as_f64()
            .unwrap()
    };
    let cached = |r: &serde_json::Value| {
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let (_, server_adapter) = complete(None);
    let (_, base) = complete(Some(serde_json::json!([])));
    assert_eq!(
        cached(&base),
        0,
        "a sequence of other weights was continued"
    );
    let (_, pinned) = complete(Some(serde_json::json!([{"id": 0, "scale": 8}])));
    let (_, off) = complete(Some(serde_json::json!([{"id": 0, "scale": 0}])));
    assert!(cached(&off) > 0, "the base model's sequence was not reused");
    assert!((first(&server_adapter) - first(&pinned)).abs() < 1e-4);
    assert!((first(&base) - first(&off)).abs() < 1e-4);
    assert!(
        (first(&server_adapter) - first(&base)).abs() > 1e-3,
        "the adapter changed nothing"
    );
    for bad in [
        serde_json::json!([{"id": 3, "scale": 1}]),
        serde_json::json!([{"id": 0, "scale": 1}, {"id": 0, "scale": 2}]),
    ] {
        let (status, body) = complete(Some(bad));
        assert_eq!(status, 400, "{body}");
    }
}
