//! Passage corpora: the StrategyQA paragraphs, the Wikipedia vital-article summaries, and
//! plain JSONL files of `{id, title, section?, text}`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One passage to index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Stable id (`"Title-N"` for StrategyQA paragraphs, as the evidence annotations use).
    pub id: String,
    /// Article title.
    pub title: String,
    /// Section heading, empty for the lead.
    #[serde(default)]
    pub section: String,
    /// The passage text.
    pub text: String,
}

/// Where a corpus comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum CorpusSource {
    /// `strategyqa/strategyqa_train_paragraphs.json`.
    StrategyQaParagraphs(PathBuf),
    /// `wiki-vital/summaries_en-us.json`.
    WikiVital(PathBuf),
    /// JSONL lines `{id, title, section?, text}`.
    Jsonl(PathBuf),
}

impl CorpusSource {
    /// The default corpus: StrategyQA paragraphs plus vital-article summaries (~19k passages).
    pub fn defaults(data_dir: &Path) -> Vec<CorpusSource> {
        vec![
            CorpusSource::StrategyQaParagraphs(
                data_dir.join("strategyqa/strategyqa_train_paragraphs.json"),
            ),
            CorpusSource::WikiVital(data_dir.join("wiki-vital/summaries_en-us.json")),
        ]
    }

    /// Picks the reader by file name: the two known corpora by name, anything else as JSONL.
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "strategyqa_train_paragraphs.json" {
            CorpusSource::StrategyQaParagraphs(path)
        } else if name == "summaries_en-us.json" {
            CorpusSource::WikiVital(path)
        } else {
            CorpusSource::Jsonl(path)
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            CorpusSource::StrategyQaParagraphs(p)
            | CorpusSource::WikiVital(p)
            | CorpusSource::Jsonl(p) => p,
        }
    }

    /// Reads every passage.
    pub fn load(&self) -> Result<Vec<Document>> {
        let path = self.path();
        let bad = |reason: String| Error::Corpus {
            path: path.to_path_buf(),
            reason,
        };
        match self {
            CorpusSource::StrategyQaParagraphs(_) => {
                #[derive(Deserialize)]
                struct Paragraph {
                    title: String,
                    #[serde(default)]
                    section: String,
                    content: String,
                }
                let map: serde_json::Map<String, serde_json::Value> = read_json(path)?;
                map.into_iter()
                    .map(|(id, v)| {
                        let p: Paragraph = serde_json::from_value(v)
                            .map_err(|e| bad(format!("paragraph {id:?}: {e}")))?;
                        Ok(Document {
                            id,
                            title: p.title,
                            section: p.section,
                            text: p.content,
                        })
                    })
                    .collect()
            }
            CorpusSource::WikiVital(_) => {
                #[derive(Deserialize)]
                struct Summary {
                    title: String,
                    extract: String,
                }
                let map: serde_json::Map<String, serde_json::Value> = read_json(path)?;
                map.into_iter()
                    .map(|(key, v)| {
                        let s: Summary = serde_json::from_value(v)
                            .map_err(|e| bad(format!("summary {key:?}: {e}")))?;
                        Ok(Document {
                            id: format!("vital:{}", s.title),
                            title: s.title,
                            section: String::new(),
                            text: s.extract,
                        })
                    })
                    .collect()
            }
            CorpusSource::Jsonl(_) => {
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                let mut docs = Vec::new();
                for (i, line) in BufReader::new(file).lines().enumerate() {
                    let line = line.map_err(|e| Error::io(path, e))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let doc: Document = serde_json::from_str(&line)
                        .map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
                    docs.push(doc);
                }
                Ok(docs)
            }
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corpus {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Loads several corpora; a passage id seen twice keeps its first occurrence.
pub fn load_all(sources: &[CorpusSource]) -> Result<Vec<Document>> {
    let mut seen = HashSet::new();
    let mut docs = Vec::new();
    for source in sources {
        for doc in source.load()? {
            if seen.insert(doc.id.clone()) {
                docs.push(doc);
            }
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"title\":\"A\",\"text\":\"x\"}\n\n{\"id\":\"b\",\"title\":\"B\"}\n",
        )
        .unwrap();
        let err = CorpusSource::Jsonl(p).load().unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn duplicate_ids_keep_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, "{\"id\":\"x\",\"title\":\"First\",\"text\":\"1\"}\n").unwrap();
        std::fs::write(&b, "{\"id\":\"x\",\"title\":\"Second\",\"text\":\"2\"}\n").unwrap();
        let docs = load_all(&[CorpusSource::Jsonl(a), CorpusSource::Jsonl(b)]).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].title, "First");
    }
}
