//! `geek eval strategyqa`: a reproducible, resumable, batched evaluation run.
//!
//! Samples are appended to `samples_<method>_<timestamp>.jsonl` and flushed one question at a
//! time; `run_<method>_<timestamp>.json` records what identifies the run. Rerunning the same
//! command finds that run, drops a half-written last line left by a kill, and skips the
//! questions already answered, so every question ends up exactly once.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::methods::{Answerer, Method, BASELINE_PROMPT_VERSION};
use crate::recall::recall_at_k;
use crate::strategyqa::Question;
use crate::{Error, Result};

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Method.
    pub method: Method,
    /// The split as given (`dev`, a path, …).
    pub split: String,
    /// The dataset file.
    pub dataset: PathBuf,
    /// Only the first N questions.
    pub limit: Option<usize>,
    /// Questions answered at once.
    pub parallel: usize,
    /// Branches explored (geek).
    pub explore: usize,
    /// Step budget (geek).
    pub max_steps: usize,
    /// Seed of sampled branches.
    pub seed: u32,
    /// Model file.
    pub model: PathBuf,
    /// Its sha256.
    pub model_sha256: String,
    /// Index directory (rag, geek).
    pub index: Option<PathBuf>,
    /// Prompt versions (baselines, agent).
    pub prompts_version: String,
    /// Where results go.
    pub out_dir: PathBuf,
}

impl RunSpec {
    /// A hash of what changes predictions (not `parallel` or `out_dir`).
    pub fn key(&self) -> String {
        let identity = serde_json::json!({
            "method": self.method, "dataset": self.dataset, "limit": self.limit,
            "explore": self.explore, "max_steps": self.max_steps, "seed": self.seed,
            "model_sha256": self.model_sha256, "index": self.index, "prompts": self.prompts_version,
        });
        let digest = Sha256::digest(identity.to_string().as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// The version string of all prompts a method uses.
pub fn prompts_version(method: Method) -> String {
    match method {
        Method::Geek => geek_agent::prompts::PROMPT_VERSION.to_string(),
        _ => BASELINE_PROMPT_VERSION.to_string(),
    }
}

/// One answered question, one line of the samples file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Position in the dataset.
    pub index: usize,
    /// Question id.
    pub qid: String,
    /// The question.
    pub question: String,
    /// Gold answer (absent for test).
    pub gold: Option<bool>,
    /// The prediction.
    pub prediction: bool,
    /// prediction == gold.
    pub correct: Option<bool>,
    /// log p(" yes").
    pub yes_logprob: f32,
    /// log p(" no").
    pub no_logprob: f32,
    /// Passage ids retrieved, in order.
    pub retrieved: Vec<String>,
    /// Recall@10 of `retrieved` against the gold evidence, when both exist.
    pub recall_at_10: Option<f64>,
    /// Sub-questions of the main branch (geek).
    pub steps: Option<usize>,
    /// Actions per kind over all branches (geek).
    pub actions: BTreeMap<String, usize>,
    /// Tokens decoded.
    pub tokens_decoded: usize,
    /// Tokens without KV reuse.
    pub tokens_without_reuse: usize,
    /// Seconds spent on this question.
    pub seconds: f64,
    /// Chain of thought (cot).
    pub reasoning: Option<String>,
    /// Why answering failed (the question then counts as wrong).
    pub error: Option<String>,
    /// The agent's trace (geek).
    pub trace: Option<geek_agent::Trace>,
}

/// Accuracy with its standard error, lm-evaluation-harness style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Questions answered.
    pub n: usize,
    /// Correct answers (None for unlabelled splits).
    pub correct: Option<usize>,
    /// Accuracy.
    pub acc: Option<f64>,
    /// Standard error of the accuracy.
    pub acc_stderr: Option<f64>,
    /// Mean Recall@10 of retrieved passages over questions with gold evidence.
    #[serde(rename = "recall@10")]
    pub recall_at_10: Option<f64>,
    /// Mean sub-questions per question (geek).
    pub mean_steps: Option<f64>,
    /// Mean actions per question, by kind (geek).
    pub mean_actions: BTreeMap<String, f64>,
    /// Tokens decoded in all.
    pub tokens_decoded: usize,
    /// Tokens a stateless API would have decoded.
    pub tokens_without_reuse: usize,
    /// Questions that failed.
    pub errors: usize,
}

/// `results_<method>_<timestamp>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// `{"strategyqa": metrics}`.
    pub results: BTreeMap<String, Metrics>,
    /// The run's definition.
    pub config: RunSpec,
    /// The git commit of the code, when known.
    pub git_commit: Option<String>,
    /// Wall time of the invocation(s) that produced the samples.
    pub wall_seconds: f64,
    /// Questions per minute.
    pub questions_per_minute: f64,
    /// The samples file.
    pub samples_file: PathBuf,
}

/// Computes the metrics of a set of samples.
pub fn metrics(samples: &[Sample]) -> Metrics {
    let n = samples.len();
    let labelled: Vec<&Sample> = samples.iter().filter(|s| s.correct.is_some()).collect();
    let correct =
        (!labelled.is_empty()).then(|| labelled.iter().filter(|s| s.correct == Some(true)).count());
    let acc = correct.map(|c| c as f64 / labelled.len() as f64);
    let acc_stderr = acc.map(|p| {
        let m = labelled.len() as f64;
        if m > 1.0 {
            (p * (1.0 - p) * m / (m - 1.0) / m).sqrt()
        } else {
            0.0
        }
    });
    let recalls: Vec<f64> = samples.iter().filter_map(|s| s.recall_at_10).collect();
    let steps: Vec<usize> = samples.iter().filter_map(|s| s.steps).collect();
    let mut mean_actions = BTreeMap::new();
    for s in samples {
        for (k, v) in &s.actions {
            *mean_actions.entry(k.clone()).or_insert(0.0) += *v as f64 / n as f64;
        }
    }
    Metrics {
        n,
        correct,
        acc,
        acc_stderr,
        recall_at_10: (!recalls.is_empty())
            .then(|| recalls.iter().sum::<f64>() / recalls.len() as f64),
        mean_steps: (!steps.is_empty())
            .then(|| steps.iter().sum::<usize>() as f64 / steps.len() as f64),
        mean_actions,
        tokens_decoded: samples.iter().map(|s| s.tokens_decoded).sum(),
        tokens_without_reuse: samples.iter().map(|s| s.tokens_without_reuse).sum(),
        errors: samples.iter().filter(|s| s.error.is_some()).count(),
    }
}

/// A UTC timestamp `YYYYMMDDTHHMMSS`.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The record of a run kept next to its samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    key: String,
    timestamp: String,
    spec: RunSpec,
    /// Wall seconds of earlier invocations.
    wall_seconds: f64,
}

/// Files of one run.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// `samples_<method>_<ts>.jsonl`.
    pub samples: PathBuf,
    /// `results_<method>_<ts>.json`.
    pub results: PathBuf,
    /// `predictions_<method>_<ts>.json` (leaderboard format).
    pub predictions: PathBuf,
    record: PathBuf,
}

fn files(out: &Path, method: Method, ts: &str) -> RunFiles {
    let m = method.name();
    RunFiles {
        samples: out.join(format!("samples_{m}_{ts}.jsonl")),
        results: out.join(format!("results_{m}_{ts}.json")),
        predictions: out.join(format!("predictions_{m}_{ts}.json")),
        record: out.join(format!("run_{m}_{ts}.json")),
    }
}

/// Finds the run with this spec's key in the output directory, or starts a new one.
fn open_run(spec: &RunSpec) -> Result<(RunFiles, RunRecord)> {
    std::fs::create_dir_all(&spec.out_dir).map_err(|e| io(&spec.out_dir, e))?;
    let key = spec.key();
    let prefix = format!("run_{}_", spec.method.name());
    let entries = std::fs::read_dir(&spec.out_dir).map_err(|e| io(&spec.out_dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(&prefix) && name.ends_with(".json")) {
            continue;
        }
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        if let Ok(record) = serde_json::from_slice::<RunRecord>(&bytes) {
            if record.key == key {
                tracing::info!(run = %record.timestamp, "resuming");
                return Ok((files(&spec.out_dir, spec.method, &record.timestamp), record));
            }
        }
    }
    let ts = timestamp();
    let record = RunRecord {
        key,
        timestamp: ts.clone(),
        spec: spec.clone(),
        wall_seconds: 0.0,
    };
    let f = files(&spec.out_dir, spec.method, &ts);
    write_json(&f.record, &record)?;
    Ok((f, record))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(value).expect("serializable"),
    )
    .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads the samples written so far, cutting off a half-written last line.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path, e)),
    };
    let mut samples = Vec::new();
    let mut good_end = 0;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        match serde_json::from_slice::<Sample>(line) {
            Ok(s) => {
                samples.push(s);
                good_end += line.len();
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping a damaged sample line and what follows");
                break;
            }
        }
    }
    if good_end < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        f.set_len(good_end as u64).map_err(|e| io(path, e))?;
    }
    Ok(samples)
}

/// What a finished invocation reports.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The results written.
    pub results: Results,
    /// The run's files.
    pub files: RunFiles,
    /// Questions answered by this invocation (the rest were already done).
    pub answered_now: usize,
}

/// Runs (or resumes) an evaluation.
pub async fn run(
    spec: RunSpec,
    questions: &[Question],
    answerer: Answerer,
    show_progress: bool,
) -> Result<RunOutcome> {
    if spec.parallel == 0 {
        return Err(Error::Config("parallel must be at least 1".into()));
    }
    let questions = &questions[..spec
        .limit
        .map_or(questions.len(), |l| l.min(questions.len()))];
    let (files, mut record) = open_run(&spec)?;
    let mut samples = read_samples(&files.samples)?;
    samples.retain(|s| s.index < questions.len() && questions[s.index].qid == s.qid);
    let mut seen = HashSet::new();
    samples.retain(|s| seen.insert(s.index));
    let todo: Vec<(usize, &Question)> = questions
        .iter()
        .enumerate()
        .filter(|(i, _)| !seen.contains(i))
        .collect();

    let bar = if show_progress {
        indicatif::ProgressBar::new(questions.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(samples.len() as u64);
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.samples)
        .map_err(|e| io(&files.samples, e))?;
    let started = Instant::now();
    let method = spec.method;
    let mut answered_now = 0;
    let mut stream = futures::stream::iter(todo)
        .map(|(index, q)| {
            let answerer = answerer.clone();
            async move {
                let t = Instant::now();
                let answer = answerer.answer(method, &q.question).await;
                (index, q, answer, t.elapsed().as_secs_f64())
            }
        })
        .buffer_unordered(spec.parallel);
    while let Some((index, q, answer, seconds)) = stream.next().await {
        let sample = to_sample(index, q, answer, seconds);
        let mut line = serde_json::to_vec(&sample).expect("serializable");
        line.push(b'\n');
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(|e| io(&files.samples, e))?;
        samples.push(sample);
        answered_now += 1;
        let m = metrics(&samples);
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        bar.set_message(format!(
            "acc {} | {:.1} q/min",
            m.acc.map_or("-".into(), |a| format!("{a:.3}")),
            answered_now as f64 / minutes.max(1e-9)
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(out);

    record.wall_seconds += started.elapsed().as_secs_f64();
    write_json(&files.record, &record)?;
    samples.sort_by_key(|s| s.index);
    let results = Results {
        results: BTreeMap::from([("strategyqa".to_string(), metrics(&samples))]),
        config: spec.clone(),
        git_commit: git_commit(),
        wall_seconds: record.wall_seconds,
        questions_per_minute: samples.len() as f64 / (record.wall_seconds / 60.0).max(1e-9),
        samples_file: files.samples.clone(),
    };
    write_json(&files.results, &results)?;
    if samples.iter().all(|s| s.gold.is_none()) {
        let preds: BTreeMap<&str, bool> = samples
            .iter()
            .map(|s| (s.qid.as_str(), s.prediction))
            .collect();
        write_json(&files.predictions, &preds)?;
    }
    Ok(RunOutcome {
        results,
        files,
        answered_now,
    })
}

fn to_sample(
    index: usize,
    q: &Question,
    answer: Result<crate::methods::MethodAnswer>,
    seconds: f64,
) -> Sample {
    let gold_ids = q.gold_paragraphs();
    match answer {
        Ok(a) => {
            let mut actions = BTreeMap::new();
            if let Some(t) = &a.trace {
                for r in t.branches.iter().flat_map(|b| &b.actions) {
                    *actions.entry(format!("{:?}", r.action)).or_insert(0) += 1;
                }
            }
            Sample {
                index,
                qid: q.qid.clone(),
                question: q.question.clone(),
                gold: q.answer,
                prediction: a.prediction,
                correct: q.answer.map(|g| g == a.prediction),
                yes_logprob: a.yes_logprob,
                no_logprob: a.no_logprob,
                recall_at_10: (!a.retrieved.is_empty())
                    .then(|| recall_at_k(&a.retrieved, &gold_ids, 10))
                    .flatten(),
                retrieved: a.retrieved,
                steps: a.trace.as_ref().map(|t| t.main_branch().steps.len()),
                actions,
                tokens_decoded: a.tokens_decoded,
                tokens_without_reuse: a.tokens_without_reuse,
                seconds,
                reasoning: a.reasoning,
                error: None,
                trace: a.trace,
            }
        }
        Err(e) => Sample {
            index,
            qid: q.qid.clone(),
            question: q.question.clone(),
            gold: q.answer,
            prediction: false,
            correct: q.answer.map(|_| false),
            yes_logprob: f32::NAN,
            no_logprob: f32::NAN,
            retrieved: Vec::new(),
            recall_at_10: None,
            steps: None,
            actions: BTreeMap::new(),
            tokens_decoded: 0,
            tokens_without_reuse: 0,
            seconds,
            reasoning: None,
            error: Some(e.to_string()),
            trace: None,
        },
    }
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Opens the model's file and hashes it (the run's identity includes it).
pub fn model_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Convenience for callers that hold the agent pieces.
pub fn answerer(
    model: Arc<dyn geek_agent::AgentModel>,
    retriever: Option<Arc<dyn geek_retriever::Retriever>>,
    agent: Option<geek_agent::Excavator>,
) -> Answerer {
    Answerer {
        model,
        retriever,
        agent: agent.map(Arc::new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_dates() {
        let ts = timestamp();
        assert_eq!(ts.len(), 15);
        assert!(ts.starts_with("20"));
        assert_eq!(&ts[8..9], "T");
    }

    #[test]
    fn a_half_written_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        let s = Sample {
            index: 0,
            qid: "q".into(),
            question: "?".into(),
            gold: Some(true),
            prediction: true,
            correct: Some(true),
            yes_logprob: -0.1,
            no_logprob: -2.0,
            retrieved: vec![],
            recall_at_10: None,
            steps: None,
            actions: BTreeMap::new(),
            tokens_decoded: 1,
            tokens_without_reuse: 1,
            seconds: 0.1,
            reasoning: None,
            error: None,
            trace: None,
        };
        let mut text = serde_json::to_string(&s).unwrap();
        text.push('\n');
        text.push_str("{\"index\":1,\"qid\":\"r\",\"quest");
        std::fs::write(&p, &text).unwrap();
        let back = read_samples(&p).unwrap();
        assert_eq!(back, vec![s]);
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("}\n"));
    }

    #[test]
    fn accuracy_and_stderr() {
        let mk = |correct: bool| Sample {
            index: 0,
            qid: "q".into(),
            question: "?".into(),
            gold: Some(true),
            prediction: correct,
            correct: Some(correct),
            yes_logprob: 0.0,
            no_logprob: 0.0,
            retrieved: vec![],
            recall_at_10: Some(0.5),
            steps: Some(2),
            actions: BTreeMap::from([("Retrieve".into(), 2)]),
            tokens_decoded: 10,
            tokens_without_reuse: 100,
            seconds: 0.0,
            reasoning: None,
            error: None,
            trace: None,
        };
        let m = metrics(&[mk(true), mk(true), mk(false), mk(true)]);
        assert_eq!(m.correct, Some(3));
        assert_eq!(m.acc, Some(0.75));
        assert!((m.acc_stderr.unwrap() - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(m.recall_at_10, Some(0.5));
        assert_eq!(m.mean_actions["Retrieve"], 2.0);
    }
}
