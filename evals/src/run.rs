//! `geek eval strategyqa`: a reproducible, resumable, batched evaluation run.
//!
//! Samples are appended to `samples_<method>_<timestamp>.jsonl` and flushed one question at a
//! time; `run_<method>_<timestamp>.json` records what identifies the run. Rerunning the same
//! command finds that run, drops a half-written last line left by a kill, and skips the
//! questions already answered, so every question ends up exactly once. One process at a time
//! writes a run (the samples file is locked); run files are created exclusively, so two runs
//! started in the same second get different names.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::methods::{Answerer, Method};
use crate::metrics::{calibrated_prediction, metrics, Metrics};
use crate::recall::recall_at_k;
use crate::samples::{finite, Sample, SamplesRead, SamplesWriter};
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
    /// Pre-answer drafting (geek).
    #[serde(default)]
    pub pre_answer: bool,
    /// Passages shown per retrieval (geek).
    #[serde(default)]
    pub passages: usize,
    /// Demonstrations shown before each question (geek).
    #[serde(default)]
    pub demonstrations: usize,
    /// The final answer reasons first (geek).
    #[serde(default)]
    pub final_reasoning: bool,
    /// Model file.
    pub model: PathBuf,
    /// Its sha256.
    pub model_sha256: String,
    /// Index directory (rag, geek).
    pub index: Option<PathBuf>,
    /// The retriever when it is not BM25 (`dense:<encoder sha256>`, `hybrid:<sha256>@1,1`):
    /// runs of other retrievers are kept apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retriever: Option<String>,
    /// Prompt versions (baselines, agent).
    pub prompts_version: String,
    /// Where results go.
    pub out_dir: PathBuf,
}

impl RunSpec {
    /// A hash of what changes predictions (not `parallel` or `out_dir`).
    pub fn key(&self) -> String {
        let mut identity = serde_json::json!({
            "method": self.method, "dataset": self.dataset, "limit": self.limit,
            "explore": self.explore, "max_steps": self.max_steps, "seed": self.seed,
            "pre_answer": self.pre_answer, "passages": self.passages,
            "demonstrations": self.demonstrations, "final_reasoning": self.final_reasoning,
            "model_sha256": self.model_sha256, "index": self.index, "prompts": self.prompts_version,
        });
        // BM25 runs keep the keys they had before other retrievers existed.
        if let Some(r) = &self.retriever {
            identity["retriever"] = serde_json::Value::String(r.clone());
        }
        let digest = Sha256::digest(identity.to_string().as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
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
    /// The samples file's name; it sits beside the results file.
    pub samples_file: PathBuf,
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

/// Finds the run with this spec's key in the output directory, or starts a new one, and
/// takes the writer's lock on its samples. The directory is locked meanwhile, so two
/// invocations never both start (or both resume) one run.
fn open_run(spec: &RunSpec) -> Result<(RunFiles, RunRecord, SamplesWriter, SamplesRead)> {
    std::fs::create_dir_all(&spec.out_dir).map_err(|e| io(&spec.out_dir, e))?;
    let lock_path = spec.out_dir.join(".geek-eval.lock");
    let dir_lock = File::create(&lock_path).map_err(|e| io(&lock_path, e))?;
    dir_lock.lock().map_err(|e| io(&lock_path, e))?;
    let (files, record) = match find_run(spec)? {
        Some(found) => found,
        None => new_run(spec)?,
    };
    let (writer, read) = SamplesWriter::open(&files.samples)?;
    drop(dir_lock);
    Ok((files, record, writer, read))
}

/// The run of this spec's key in the output directory, if there is one.
fn find_run(spec: &RunSpec) -> Result<Option<(RunFiles, RunRecord)>> {
    let key = spec.key();
    let prefix = format!("run_{}_", spec.method.name());
    let entries = std::fs::read_dir(&spec.out_dir).map_err(|e| io(&spec.out_dir, e))?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        .collect();
    names.sort();
    for name in names {
        let Ok(bytes) = std::fs::read(spec.out_dir.join(&name)) else {
            continue;
        };
        if let Ok(record) = serde_json::from_slice::<RunRecord>(&bytes) {
            if record.key == key {
                tracing::info!(run = %record.timestamp, "resuming");
                let f = files(&spec.out_dir, spec.method, &record.timestamp);
                return Ok(Some((f, record)));
            }
        }
    }
    Ok(None)
}

/// A new run whose files no other run has: its record is created exclusively.
fn new_run(spec: &RunSpec) -> Result<(RunFiles, RunRecord)> {
    let ts = timestamp();
    for attempt in 0..1000 {
        let stamp = if attempt == 0 {
            ts.clone()
        } else {
            format!("{ts}-{attempt}")
        };
        let f = files(&spec.out_dir, spec.method, &stamp);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f.record);
        match created {
            Ok(mut file) => {
                let record = RunRecord {
                    key: spec.key(),
                    timestamp: stamp,
                    spec: spec.clone(),
                    wall_seconds: 0.0,
                };
                let json = serde_json::to_vec_pretty(&record).expect("serializable");
                file.write_all(&json).map_err(|e| io(&f.record, e))?;
                return Ok((f, record));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&f.record, e)),
        }
    }
    Err(Error::Config(format!(
        "cannot find a free run name in {}",
        spec.out_dir.display()
    )))
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

/// What a finished invocation reports.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The results written.
    pub results: Results,
    /// The run's files.
    pub files: RunFiles,
    /// Questions answered by this invocation (the rest were already done).
    pub answered_now: usize,
    /// Damaged lines of the samples file that were skipped (their questions answered again).
    pub damaged_lines: usize,
}

/// Progress of a run, for the caller to show.
#[derive(Debug, Clone, PartialEq)]
pub enum RunProgress {
    /// The run is about to answer; `done` questions were answered by earlier invocations.
    Started {
        /// Questions in the run.
        total: usize,
        /// Already answered.
        done: usize,
    },
    /// One more question answered.
    Answered {
        /// Answered so far (earlier invocations included).
        done: usize,
        /// Questions in the run.
        total: usize,
        /// Accuracy so far.
        acc: Option<f64>,
        /// Questions per minute of this invocation.
        per_minute: f64,
    },
}

/// Runs (or resumes) an evaluation. Each calibration (offset, source) adds calibrated
/// metrics, the first also to the test split's predictions; `progress` sees every answered
/// question.
// Longer than 80 lines: a resumable run end to end: lock, files, resume, the questions in flight, the samples written, the results with each calibration.
pub async fn run(
    spec: RunSpec,
    questions: &[Question],
    answerer: Answerer,
    calibrations: &[(f32, String)],
    progress: &mut (dyn FnMut(RunProgress) + Send),
) -> Result<RunOutcome> {
    if spec.parallel == 0 {
        return Err(Error::Config("parallel must be at least 1".into()));
    }
    let questions = &questions[..spec
        .limit
        .map_or(questions.len(), |l| l.min(questions.len()))];
    let (files, mut record, mut writer, read) = open_run(&spec)?;
    let damaged_lines = read.damaged.len();
    let mut samples = read.samples;
    samples.retain(|s| s.index < questions.len() && questions[s.index].qid == s.qid);
    let mut seen = HashSet::new();
    samples.retain(|s| seen.insert(s.index));
    let todo: Vec<(usize, &Question)> = questions
        .iter()
        .enumerate()
        .filter(|(i, _)| !seen.contains(i))
        .collect();
    progress(RunProgress::Started {
        total: questions.len(),
        done: samples.len(),
    });
    let calib: Vec<(f32, &str)> = calibrations.iter().map(|(o, s)| (*o, s.as_str())).collect();
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
        writer.append(&sample)?;
        samples.push(sample);
        answered_now += 1;
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        progress(RunProgress::Answered {
            done: samples.len(),
            total: questions.len(),
            acc: metrics(&samples, &[]).acc,
            per_minute: answered_now as f64 / minutes.max(1e-9),
        });
    }
    drop(stream);
    record.wall_seconds += started.elapsed().as_secs_f64();
    write_json(&files.record, &record)?;
    samples.sort_by_key(|s| s.index);
    let results = Results {
        results: BTreeMap::from([("strategyqa".to_string(), metrics(&samples, &calib))]),
        config: spec.clone(),
        git_commit: git_commit(),
        wall_seconds: record.wall_seconds,
        questions_per_minute: samples.len() as f64 / (record.wall_seconds / 60.0).max(1e-9),
        samples_file: file_name(&files.samples),
    };
    write_json(&files.results, &results)?;
    if samples.iter().all(|s| s.gold.is_none()) {
        let preds: BTreeMap<&str, bool> = samples
            .iter()
            .map(|s| {
                let p = calib
                    .first()
                    .map_or(s.prediction, |&(o, _)| calibrated_prediction(s, o));
                (s.qid.as_str(), p)
            })
            .collect();
        write_json(&files.predictions, &preds)?;
    }
    drop(writer);
    Ok(RunOutcome {
        results,
        files,
        answered_now,
        damaged_lines,
    })
}

fn file_name(path: &Path) -> PathBuf {
    path.file_name().map_or_else(PathBuf::new, PathBuf::from)
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
                yes_logprob: finite(a.yes_logprob),
                no_logprob: finite(a.no_logprob),
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
            yes_logprob: None,
            no_logprob: None,
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn timestamps_are_civil_dates() {
        let ts = timestamp();
        assert_eq!(ts.len(), 15);
        assert!(ts.starts_with("20"));
        assert_eq!(&ts[8..9], "T");
    }

    /// Six labelled questions, answered by a scripted model ("yes" for even ones).
    fn scripted() -> (Vec<Question>, Answerer) {
        let questions: Vec<Question> = (0..6)
            .map(|i| {
                serde_json::from_value(serde_json::json!({
                    "qid": format!("q{i}"),
                    "question": format!("Is {i} even?"),
                    "answer": i % 2 == 0,
                }))
                .unwrap()
            })
            .collect();
        let model =
            geek_agent::scripted::ScriptedModel::new(|_, _| " ok\n".into()).with_scores(|t, _| {
                let even = ["0", "2", "4"]
                    .iter()
                    .any(|d| t.contains(&format!("Is {d} even")));
                if even {
                    vec![-0.1, -2.0]
                } else {
                    vec![-2.0, -0.1]
                }
            });
        let answerer = Answerer {
            model: Arc::new(model),
            retriever: None,
            agent: None,
        };
        (questions, answerer)
    }

    fn spec(out: &Path) -> RunSpec {
        RunSpec {
            method: Method::Direct,
            split: "test".into(),
            dataset: PathBuf::from("scripted.json"),
            limit: None,
            parallel: 2,
            explore: 1,
            max_steps: 8,
            seed: 0,
            pre_answer: false,
            passages: 3,
            demonstrations: 0,
            final_reasoning: false,
            model: PathBuf::from("scripted"),
            model_sha256: "0".into(),
            index: None,
            retriever: None,
            prompts_version: "v".into(),
            out_dir: out.to_path_buf(),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Any sequence of kills (after some answers, possibly in the middle of writing the
        /// next line) followed by a complete run leaves every question exactly once.
        #[test]
        fn any_kill_points_leave_every_question_exactly_once(
            kills in proptest::collection::vec((0usize..6, 0usize..400), 0..5)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (questions, answerer) = scripted();
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for (after, torn) in kills {
                let mut answered = 0;
                let mut kill = |p: RunProgress| {
                    if let RunProgress::Answered { .. } = p {
                        answered += 1;
                        if answered > after {
                            panic!("killed");
                        }
                    }
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(run(spec(dir.path()), &questions, answerer.clone(), &[], &mut kill))
                }));
                let _ = result;
                // A kill in the middle of the next write leaves part of a line.
                if let Some(samples) = std::fs::read_dir(dir.path()).unwrap().flatten()
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().contains("samples_"))
                {
                    let line = r#"{"index":5,"qid":"q5","question":"Is 5 even?","gold":false,"prediction":false"#;
                    let cut = &line[..torn.min(line.len())];
                    let mut f = std::fs::OpenOptions::new().append(true).open(&samples).unwrap();
                    std::io::Write::write_all(&mut f, cut.as_bytes()).unwrap();
                }
            }
            let done = runtime
                .block_on(run(spec(dir.path()), &questions, answerer, &[], &mut |_| {}))
                .unwrap();
            let read = crate::samples::read_samples(&done.files.samples).unwrap();
            let mut indices: Vec<usize> = read.samples.iter().map(|s| s.index).collect();
            indices.sort_unstable();
            proptest::prop_assert_eq!(indices, (0..6).collect::<Vec<_>>());
            proptest::prop_assert!(read.damaged.is_empty());
            proptest::prop_assert_eq!(read.torn_tail, 0);
            proptest::prop_assert_eq!(done.results.results["strategyqa"].correct, Some(6));
        }
    }
}
