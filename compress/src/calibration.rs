//! Calibration text for the learned methods (quantization, pruning): documents from passage
//! corpora, plain text, or the training data's `{prompt, completion}` JSONL, shuffled and cut
//! into rows of tokens.
//!
//! Encyclopedia text keeps a model's language modelling; an instruct model's answers live in
//! its chat format, so the training data (the agent's own prompts, rendered in the model's chat
//! template, with their completions) is calibration text too: each example is one document,
//! its special tokens parsed as the model's.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use geek_backend::Engine;
use geek_retriever::CorpusSource;

use crate::data::{read_jsonl, shuffled};
use crate::distill::calibration_rows;
use crate::{Error, Result};

/// Where calibration text comes from and how much of it is used.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationText {
    /// Passage corpora (StrategyQA paragraphs, vital articles, JSONL `{id, title, text}`),
    /// training data (JSONL `{prompt, completion}`: one document per example) or `.txt` files,
    /// whose paragraphs (blank-line separated) are the documents.
    pub files: Vec<PathBuf>,
    /// Rows to cut (the learned method holds some out).
    pub rows: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Shuffling seed of the documents.
    pub seed: u64,
}

impl CalibrationText {
    /// `rows` rows of `seq_len` tokens from `files`, or from the default corpus of `data_dir`
    /// when no file is given.
    pub fn new(
        files: &[PathBuf],
        data_dir: &Path,
        rows: usize,
        seq_len: usize,
        seed: u64,
    ) -> CalibrationText {
        CalibrationText {
            files: if files.is_empty() {
                CalibrationText::default_files(data_dir)
            } else {
                files.to_vec()
            },
            rows,
            seq_len,
            seed,
        }
    }

    /// The default corpus of a data directory: StrategyQA paragraphs and vital articles
    /// (never the perplexity test text).
    pub fn default_files(data_dir: &Path) -> Vec<PathBuf> {
        CorpusSource::defaults(data_dir)
            .iter()
            .map(|s| s.path().to_path_buf())
            .collect()
    }

    /// The documents' text.
    fn documents(&self) -> Result<Vec<String>> {
        let mut texts = Vec::new();
        let mut sources = Vec::new();
        for path in &self.files {
            if path.extension().is_some_and(|e| e == "txt") {
                let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
                texts.extend(text.split("\n\n").map(|p| format!("{p}\n\n")));
            } else if is_training_data(path)? {
                texts.extend(
                    read_jsonl(path)?
                        .into_iter()
                        .map(|ex| format!("{}{}", ex.prompt, ex.completion)),
                );
            } else {
                sources.push(CorpusSource::from_path(path));
            }
        }
        let docs = geek_retriever::corpus::load_all(&sources)
            .map_err(|e| Error::Config(format!("calibration corpus: {e}")))?;
        texts.extend(
            docs.into_iter()
                .map(|d| format!("{}\n{}\n\n", d.title, d.text)),
        );
        Ok(texts)
    }

    /// Rows of `seq_len` tokens from the shuffled documents, tokenized by `tokenizer` (special
    /// tokens such as a chat template's parsed as the model's).
    pub fn rows(&self, tokenizer: &Engine) -> Result<Vec<Vec<u32>>> {
        let texts = self.documents()?;
        let wanted = self.rows * self.seq_len;
        let (mut documents, mut tokens) = (Vec::new(), 0usize);
        for i in shuffled(texts.len(), self.seed) {
            if tokens >= wanted {
                break;
            }
            let doc: Vec<u32> = tokenizer
                .tokenize(texts[i].clone(), false)
                .wait()?
                .into_iter()
                .map(|t| t as u32)
                .collect();
            tokens += doc.len();
            documents.push(doc);
        }
        let rows = calibration_rows(&documents, self.seq_len, self.rows);
        if rows.len() < self.rows {
            return Err(Error::Config(format!(
                "calibration text holds {} rows of {} tokens, {} asked",
                rows.len(),
                self.seq_len,
                self.rows
            )));
        }
        Ok(rows)
    }
}

/// Whether `path` is training data: JSONL whose first record has a `prompt` and a
/// `completion` (passage corpora have `title` and `text`).
fn is_training_data(path: &Path) -> Result<bool> {
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(false);
    }
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(Error::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            // Not ours to judge: the corpus reader reports malformed lines with their numbers.
            Err(_) => return Ok(false),
        };
        return Ok(record.get("prompt").is_some() && record.get("completion").is_some());
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn training_data_is_one_document_per_example_and_passages_stay_passages() {
        let dir = tempfile::tempdir().unwrap();
        let training = write(
            dir.path(),
            "train.jsonl",
            "{\"prompt\": \"<|im_start|>user\\nQ?<|im_end|>\\nAnswer:\", \"completion\": \" yes\"}\n\n{\"prompt\": \"P\\n\\nQ\", \"completion\": \" no\"}\n",
        );
        let passages = write(
            dir.path(),
            "passages.jsonl",
            "{\"id\": \"a\", \"title\": \"Llama\", \"text\": \"A llama is a camelid.\"}\n",
        );
        let plain = write(dir.path(), "notes.txt", "one\n\ntwo");
        assert!(is_training_data(&training).unwrap());
        assert!(!is_training_data(&passages).unwrap());
        assert!(!is_training_data(&plain).unwrap());
        let text = CalibrationText::new(&[training, passages, plain], dir.path(), 1, 8, 0);
        let mut docs = text.documents().unwrap();
        docs.sort();
        assert_eq!(
            docs,
            [
                "<|im_start|>user\nQ?<|im_end|>\nAnswer: yes",
                "Llama\nA llama is a camelid.\n\n",
                "P\n\nQ no",
                "one\n\n",
                "two\n\n",
            ]
        );
    }

    #[test]
    fn a_malformed_training_file_is_an_error_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(
            dir.path(),
            "train.jsonl",
            "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": 3}\n",
        );
        let text = CalibrationText::new(&[bad], dir.path(), 1, 8, 0);
        match text.documents() {
            Err(Error::Data { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a data error, got {other:?}"),
        }
    }
}
