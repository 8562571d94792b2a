//! `geek eval retrieval`: Recall@10 of the BM25 retriever on StrategyQA, in the StrategyQA
//! paper's two settings — the question alone (IR-Q) and one query per gold decomposition step,
//! merged by score (IR-ORA-D).

use std::collections::HashMap;
use std::time::Instant;

use geek_retriever::Bm25Index;
use serde::Serialize;

use crate::recall::{mean_recall, recall_at_k};
use crate::strategyqa::Question;
use crate::Result;

/// How queries are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    /// The question text (stop words are removed by the analyzer).
    Question,
    /// One query per gold decomposition step, results merged by score.
    Decomposition,
}

impl std::str::FromStr for QueryMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "question" => Ok(QueryMode::Question),
            "decomposition" => Ok(QueryMode::Decomposition),
            other => Err(format!(
                "mode must be question or decomposition, not {other:?}"
            )),
        }
    }
}

/// The figures of one retrieval evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    /// Query mode.
    pub mode: QueryMode,
    /// Cut-off.
    pub k: usize,
    /// Questions evaluated.
    pub questions: usize,
    /// Questions with gold paragraphs (the average is over these).
    pub scored: usize,
    /// Mean Recall@k.
    pub recall: f64,
    /// Passages in the index.
    pub index_documents: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Removes `#1`-style references to earlier steps: they are not words to search for.
fn strip_step_refs(step: &str) -> String {
    let mut out = String::with_capacity(step.len());
    let mut chars = step.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '#' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                chars.next();
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The ids of the top `k` passages for a question in `mode`.
pub fn retrieve_ids(
    index: &Bm25Index,
    q: &Question,
    mode: QueryMode,
    k: usize,
) -> Result<Vec<String>> {
    match mode {
        QueryMode::Question => Ok(index
            .search(&q.question, k)?
            .into_iter()
            .map(|p| p.id)
            .collect()),
        QueryMode::Decomposition => {
            let mut best: HashMap<String, f32> = HashMap::new();
            for step in &q.decomposition {
                for p in index.search(&strip_step_refs(step), k)? {
                    let s = best.entry(p.id).or_insert(f32::MIN);
                    *s = s.max(p.score);
                }
            }
            let mut ranked: Vec<(String, f32)> = best.into_iter().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            Ok(ranked.into_iter().take(k).map(|(id, _)| id).collect())
        }
    }
}

/// Recall@k over `questions`.
pub fn evaluate(
    index: &Bm25Index,
    questions: &[Question],
    mode: QueryMode,
    k: usize,
) -> Result<RetrievalReport> {
    let start = Instant::now();
    let per_question = questions
        .iter()
        .map(|q| {
            Ok(recall_at_k(
                &retrieve_ids(index, q, mode, k)?,
                &q.gold_paragraphs(),
                k,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let (recall, scored) = mean_recall(&per_question);
    Ok(RetrievalReport {
        mode,
        k,
        questions: questions.len(),
        scored,
        recall,
        index_documents: index.meta().documents,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_references_are_removed() {
        assert_eq!(
            strip_step_refs("Is #1 greater than #12?"),
            "Is  greater than ?"
        );
        assert_eq!(strip_step_refs("C# is #fun"), "C# is #fun");
    }
}
