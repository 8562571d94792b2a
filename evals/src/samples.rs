//! The samples file of a run: one JSON line per answered question.
//!
//! Reading never writes: [`read_samples`] skips a damaged line (and reports it) instead of
//! cutting off what follows, and leaves a torn last line where it is. Only the writer of a
//! run, [`SamplesWriter::open`], repairs a torn last line (a kill in the middle of a write)
//! before it appends, and it holds an exclusive lock on the file so that two processes never
//! write one run.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

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
    /// The prediction (raw: `yes_logprob > no_logprob`, or the agent's vote).
    pub prediction: bool,
    /// prediction == gold.
    pub correct: Option<bool>,
    /// log p(" yes"); absent when answering failed.
    #[serde(default)]
    pub yes_logprob: Option<f32>,
    /// log p(" no"); absent when answering failed.
    #[serde(default)]
    pub no_logprob: Option<f32>,
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

impl Sample {
    /// `log p(yes) − log p(no)`, when both are known.
    pub fn margin(&self) -> Option<f32> {
        Some(self.yes_logprob? - self.no_logprob?)
    }
}

/// A finite log-probability, or `None` (JSON has no NaN or infinity).
pub fn finite(x: f32) -> Option<f32> {
    x.is_finite().then_some(x)
}

/// A line of a samples file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedLine {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// What [`read_samples`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplesRead {
    /// The samples of every well-formed line, in file order.
    pub samples: Vec<Sample>,
    /// Complete lines that are not samples; skipped.
    pub damaged: Vec<DamagedLine>,
    /// Bytes of a last line without its newline (a write cut short), 0 if none.
    pub torn_tail: usize,
}

/// Reads a samples file without changing it. A missing file has no samples.
pub fn read_samples(path: &Path) -> Result<SamplesRead> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SamplesRead::default()),
        Err(e) => return Err(io(path, e)),
    };
    Ok(parse_samples(&bytes))
}

/// Parses the bytes of a samples file (see [`read_samples`]).
pub fn parse_samples(bytes: &[u8]) -> SamplesRead {
    let mut read = SamplesRead::default();
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        if !line.ends_with(b"\n") {
            read.torn_tail = line.len();
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Sample>(line) {
            Ok(s) => read.samples.push(s),
            Err(e) => read.damaged.push(DamagedLine {
                line: i + 1,
                reason: e.to_string(),
            }),
        }
    }
    read
}

/// The one process that appends to a run's samples file; holds an exclusive lock on it.
#[derive(Debug)]
pub struct SamplesWriter {
    path: PathBuf,
    file: File,
}

impl SamplesWriter {
    /// Opens (or creates) `path` for appending, taking its lock, and returns what it holds.
    /// A torn last line is cut off here, and only here; damaged lines are kept and skipped.
    pub fn open(path: &Path) -> Result<(SamplesWriter, SamplesRead)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::RunBusy {
                    path: path.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(path, e)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io(path, e))?;
        let read = parse_samples(&bytes);
        if read.torn_tail > 0 {
            tracing::warn!(path = %path.display(), bytes = read.torn_tail, "cutting off a half-written last sample");
            file.set_len((bytes.len() - read.torn_tail) as u64)
                .map_err(|e| io(path, e))?;
        }
        for d in &read.damaged {
            tracing::warn!(path = %path.display(), line = d.line, reason = %d.reason, "skipping a damaged sample line");
        }
        Ok((
            SamplesWriter {
                path: path.to_path_buf(),
                file,
            },
            read,
        ))
    }

    /// Appends one sample as a line and flushes it.
    pub fn append(&mut self, sample: &Sample) -> Result<()> {
        let mut line = serde_json::to_vec(sample).expect("samples serialize");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| io(&self.path, e))
    }
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(index: usize, correct: bool) -> Sample {
        Sample {
            index,
            qid: format!("q{index}"),
            question: "?".into(),
            gold: Some(true),
            prediction: correct,
            correct: Some(correct),
            yes_logprob: Some(-0.1),
            no_logprob: Some(-2.0),
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
        }
    }

    fn line(s: &Sample) -> String {
        serde_json::to_string(s).unwrap() + "\n"
    }

    #[test]
    fn reading_leaves_a_torn_line_and_the_writer_cuts_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        let text = line(&sample(0, true)) + "{\"index\":1,\"qid\":\"r\",\"quest";
        std::fs::write(&p, &text).unwrap();
        let read = read_samples(&p).unwrap();
        assert_eq!(read.samples, vec![sample(0, true)]);
        assert!(read.torn_tail > 0);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "reading wrote");
        let (mut w, again) = SamplesWriter::open(&p).unwrap();
        assert_eq!(again.samples.len(), 1);
        w.append(&sample(1, false)).unwrap();
        let back = read_samples(&p).unwrap();
        assert_eq!(back.samples, vec![sample(0, true), sample(1, false)]);
        assert_eq!(back.torn_tail, 0);
    }

    /// Regression: a failed question was written with NaN log-probs (`null` in JSON), which
    /// could not be read back, and everything after it was cut off on resume.
    #[test]
    fn a_failed_question_and_a_damaged_line_lose_nothing_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        let mut failed = sample(1, false);
        failed.yes_logprob = None;
        failed.no_logprob = None;
        failed.error = Some("context overflow".into());
        // A line as older versions wrote it for a failed question.
        let old_failed = line(&sample(2, false))
            .replace("\"yes_logprob\":-0.1", "\"yes_logprob\":null")
            .replace("\"no_logprob\":-2.0", "\"no_logprob\":null");
        let text = line(&sample(0, true))
            + &line(&failed)
            + "this is not json\n"
            + &old_failed
            + &line(&sample(3, true));
        std::fs::write(&p, &text).unwrap();
        let (_w, read) = SamplesWriter::open(&p).unwrap();
        let indices: Vec<usize> = read.samples.iter().map(|s| s.index).collect();
        assert_eq!(indices, vec![0, 1, 2, 3]);
        assert_eq!(read.samples[1], failed);
        assert_eq!(read.damaged.len(), 1);
        assert_eq!(read.damaged[0].line, 3);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        let (_first, _) = SamplesWriter::open(&p).unwrap();
        let second = SamplesWriter::open(&p).unwrap_err();
        assert!(matches!(second, Error::RunBusy { .. }), "{second}");
        assert!(second.to_string().contains("another"), "{second}");
        drop(_first);
        assert!(SamplesWriter::open(&p).is_ok());
    }

    #[test]
    fn non_finite_log_probs_are_not_written() {
        assert_eq!(finite(f32::NAN), None);
        assert_eq!(finite(f32::NEG_INFINITY), None);
        assert_eq!(finite(-1.5), Some(-1.5));
    }
}
