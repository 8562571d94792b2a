//! Few-shot demonstrations chosen per question: the StrategyQA *train* questions most like
//! the one asked, with their gold decompositions and facts, shown before it.
//!
//! Similarity is IDF-weighted overlap of content words, computed over the questions in
//! memory (2,061 train questions take a few milliseconds). A question identical to the one
//! asked is never its own demonstration.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::prompts::{content_words, Demonstration};
use crate::{Error, Result};

/// Solved questions to draw demonstrations from.
#[derive(Debug, Clone, Default)]
pub struct DemoBank {
    demos: Vec<Demonstration>,
    words: Vec<Vec<String>>,
    idf: HashMap<String, f32>,
}

impl DemoBank {
    /// A bank of `demos`.
    pub fn new(demos: Vec<Demonstration>) -> Self {
        let words: Vec<Vec<String>> = demos.iter().map(|d| content_words(&d.question)).collect();
        let mut df: HashMap<String, usize> = HashMap::new();
        for ws in &words {
            for w in ws {
                *df.entry(w.clone()).or_insert(0) += 1;
            }
        }
        let n = demos.len().max(1) as f32;
        let idf = df
            .into_iter()
            .map(|(w, c)| (w, (n / c as f32).ln() + 1.0))
            .collect();
        DemoBank { demos, words, idf }
    }

    /// Reads a StrategyQA file (`question`, `answer`, `decomposition`, `facts`); questions
    /// without a decomposition or answer are skipped. Use the train split only.
    pub fn from_strategyqa(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Item {
            question: String,
            answer: Option<bool>,
            #[serde(default)]
            decomposition: Vec<String>,
            #[serde(default)]
            facts: Vec<String>,
        }
        let bad = |reason: String| Error::Demonstrations {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let items: Vec<Item> =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not StrategyQA JSON: {e}")))?;
        let demos = items
            .into_iter()
            .filter_map(|it| {
                let answer = it.answer?;
                (!it.decomposition.is_empty()).then_some(Demonstration {
                    question: it.question,
                    sub_questions: it.decomposition,
                    facts: it.facts,
                    answer,
                })
            })
            .collect();
        Ok(Self::new(demos))
    }

    /// Number of demonstrations.
    pub fn len(&self) -> usize {
        self.demos.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.demos.is_empty()
    }

    /// The `k` demonstrations most like `question` (never the question itself), best first.
    pub fn nearest(&self, question: &str, k: usize) -> Vec<Demonstration> {
        if k == 0 {
            return Vec::new();
        }
        let asked = content_words(question);
        let same = |q: &str| normalise(q) == normalise(question);
        let mut scored: Vec<(f32, usize)> = self
            .words
            .iter()
            .enumerate()
            .filter(|(i, _)| !same(&self.demos[*i].question))
            .map(|(i, ws)| {
                let score: f32 = asked
                    .iter()
                    .filter(|w| ws.contains(w))
                    .map(|w| self.idf.get(w).copied().unwrap_or(1.0))
                    .sum();
                (score, i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(k)
            .map(|(_, i)| self.demos[i].clone())
            .collect()
    }
}

fn normalise(q: &str) -> String {
    q.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo(q: &str, answer: bool) -> Demonstration {
        Demonstration {
            question: q.into(),
            sub_questions: vec!["What?".into()],
            facts: vec!["A fact.".into()],
            answer,
        }
    }

    #[test]
    fn the_most_similar_questions_come_first_and_never_the_question_itself() {
        let bank = DemoBank::new(vec![
            demo(
                "Could a llama give birth twice during the Vietnam War?",
                true,
            ),
            demo("Do llamas live in the Andes?", true),
            demo("Is Paris the capital of France?", false),
            demo("Did the Vietnam War last longer than World War II?", true),
        ]);
        let got = bank.nearest("Could a llama give birth twice during the Vietnam War?", 2);
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|d| d.question != "Could a llama give birth twice during the Vietnam War?"));
        assert!(got.iter().any(|d| d.question.contains("llamas")));
        assert!(got.iter().any(|d| d.question.contains("Vietnam")));
        assert!(bank.nearest("anything", 0).is_empty());
    }
}
