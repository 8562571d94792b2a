//! The StrategyQA files as released (`qid, term, description, question, answer, facts,
//! decomposition, evidence`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One annotator's evidence for one decomposition step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StepEvidence {
    /// Lists of paragraph ids (`"Title-N"`).
    Paragraphs(Vec<Vec<String>>),
    /// A marker: `operation` (computed from earlier steps) or `no_evidence`.
    Marker(String),
}

/// One StrategyQA question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// Question id.
    pub qid: String,
    /// The Wikipedia term the question was written from.
    #[serde(default)]
    pub term: String,
    /// The question.
    pub question: String,
    /// Gold yes/no answer (absent in the test file).
    #[serde(default)]
    pub answer: Option<bool>,
    /// Supporting facts written by the annotator.
    #[serde(default)]
    pub facts: Vec<String>,
    /// Gold decomposition; steps refer to earlier answers as `#1`, `#2`.
    #[serde(default)]
    pub decomposition: Vec<String>,
    /// Per annotator, per step, the evidence.
    #[serde(default)]
    pub evidence: Vec<Vec<Vec<serde_json::Value>>>,
}

impl Question {
    /// Gold paragraph ids per annotator (steps marked `operation` / `no_evidence` excluded).
    pub fn gold_paragraphs(&self) -> Vec<Vec<String>> {
        self.evidence
            .iter()
            .map(|annotator| {
                let mut ids: Vec<String> = Vec::new();
                for step in annotator {
                    collect_ids(step, &mut ids);
                }
                ids.sort();
                ids.dedup();
                ids
            })
            .collect()
    }

    /// Per decomposition step, the gold paragraph ids any annotator gave it (sorted).
    pub fn step_paragraphs(&self) -> Vec<Vec<String>> {
        let mut steps = vec![Vec::new(); self.decomposition.len()];
        for annotator in &self.evidence {
            for (i, step) in annotator.iter().enumerate().take(steps.len()) {
                collect_ids(step, &mut steps[i]);
            }
        }
        for ids in &mut steps {
            ids.sort();
            ids.dedup();
        }
        steps
    }
}

/// Paragraph ids inside one step's evidence: nested lists of strings, markers skipped.
fn collect_ids(values: &[serde_json::Value], out: &mut Vec<String>) {
    for v in values {
        match v {
            serde_json::Value::String(s) if s != "operation" && s != "no_evidence" => {
                out.push(s.clone())
            }
            serde_json::Value::Array(inner) => collect_ids(inner, out),
            _ => {}
        }
    }
}

/// A named split or a file path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// `strategyqa/train.json` (2,061).
    Train,
    /// `strategyqa/dev.json` (229, the GEEK paper's dev split).
    Dev,
    /// `strategyqa/strategyqa_train.json` (all 2,290 official train questions).
    Full,
    /// `strategyqa/strategyqa_test.json` (490, no answers).
    Test,
    /// Any file in the same format.
    Path(PathBuf),
}

impl std::str::FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "train" => Split::Train,
            "dev" => Split::Dev,
            "full" | "train-full" => Split::Full,
            "test" => Split::Test,
            other => Split::Path(PathBuf::from(other)),
        })
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Train => f.write_str("train"),
            Split::Dev => f.write_str("dev"),
            Split::Full => f.write_str("full"),
            Split::Test => f.write_str("test"),
            Split::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Split {
    /// The file of this split under the shared data directory.
    pub fn path(&self, data_dir: &Path) -> PathBuf {
        let dir = data_dir.join("strategyqa");
        match self {
            Split::Train => dir.join("train.json"),
            Split::Dev => dir.join("dev.json"),
            Split::Full => dir.join("strategyqa_train.json"),
            Split::Test => dir.join("strategyqa_test.json"),
            Split::Path(p) => p.clone(),
        }
    }
}

/// Reads a StrategyQA file. Every question is checked before any is returned; the first
/// malformed one is reported with its index and qid.
pub fn load(path: &Path) -> Result<Vec<Question>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| Error::Dataset {
        path: path.to_path_buf(),
        reason,
    };
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a JSON array: {e}")))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let qid = v
                .get("qid")
                .and_then(|q| q.as_str())
                .unwrap_or("?")
                .to_string();
            serde_json::from_value(v)
                .map_err(|e| bad(format!("question {} (qid {qid}): {e}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_paragraphs_skip_markers_and_dedup() {
        let q: Question = serde_json::from_value(serde_json::json!({
            "qid": "x", "question": "q?", "answer": true,
            "evidence": [
                [[["A-1"], ["B-2", "A-1"]], ["operation"], ["no_evidence"]],
                [["operation"]]
            ]
        }))
        .unwrap();
        assert_eq!(
            q.gold_paragraphs(),
            vec![vec!["A-1".to_string(), "B-2".into()], vec![]]
        );
    }

    #[test]
    fn malformed_questions_are_reported_with_position() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(
            &p,
            r#"[{"qid":"a","question":"ok?"},{"qid":"b","question":7}]"#,
        )
        .unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("question 2") && err.contains("qid b"), "{err}");
    }
}
