//! `geek eval retrieval`: Recall@10 of a retriever (BM25, dense or hybrid) on StrategyQA, in
//! the StrategyQA paper's two settings — the question alone (IR-Q) and one query per gold
//! decomposition step, merged by score (IR-ORA-D) — with the latency of its queries.

use std::collections::HashMap;
use std::time::Instant;

use geek_retriever::Passage;
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
    /// Median latency of one query, milliseconds.
    pub latency_p50_ms: f64,
}

/// A search: the `k` best passages for a query, best first (BM25, dense, or both fused).
pub type Search<'a> = dyn Fn(&str, usize) -> geek_retriever::Result<Vec<Passage>> + 'a;

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

/// (query, gold paragraph id) pairs of `questions`, for training a retriever: the question
/// with every paragraph of its evidence, and each decomposition step (references to earlier
/// steps removed) with the paragraphs given for it. Question by question, in order, each
/// pair once.
pub fn evidence_pairs(questions: &[Question]) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for q in questions {
        let mut add = |query: String, id: &String| {
            let query = query.split_whitespace().collect::<Vec<_>>().join(" ");
            if !query.is_empty() && seen.insert((query.clone(), id.clone())) {
                out.push((query, id.clone()));
            }
        };
        for id in q.gold_paragraphs().iter().flatten() {
            add(q.question.clone(), id);
        }
        for (step, ids) in q.decomposition.iter().zip(q.step_paragraphs()) {
            for id in &ids {
                add(strip_step_refs(step), id);
            }
        }
    }
    out
}

/// The ids of the top `k` passages for a question in `mode`; each query's latency is added
/// to `latencies` (seconds).
pub fn retrieve_ids(
    search: &Search,
    q: &Question,
    mode: QueryMode,
    k: usize,
    latencies: &mut Vec<f64>,
) -> Result<Vec<String>> {
    let mut timed = |query: &str| {
        let t0 = Instant::now();
        let hits = search(query, k);
        latencies.push(t0.elapsed().as_secs_f64());
        hits
    };
    match mode {
        QueryMode::Question => Ok(timed(&q.question)?.into_iter().map(|p| p.id).collect()),
        QueryMode::Decomposition => {
            let mut best: HashMap<String, f32> = HashMap::new();
            for step in &q.decomposition {
                for p in timed(&strip_step_refs(step))? {
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

/// Recall@k over `questions` of `search` on an index of `documents` passages.
pub fn evaluate(
    search: &Search,
    documents: usize,
    questions: &[Question],
    mode: QueryMode,
    k: usize,
) -> Result<RetrievalReport> {
    let start = Instant::now();
    let mut latencies = Vec::new();
    let per_question = questions
        .iter()
        .map(|q| {
            Ok(recall_at_k(
                &retrieve_ids(search, q, mode, k, &mut latencies)?,
                &q.gold_paragraphs(),
                k,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let (recall, scored) = mean_recall(&per_question);
    latencies.sort_by(f64::total_cmp);
    Ok(RetrievalReport {
        mode,
        k,
        questions: questions.len(),
        scored,
        recall,
        index_documents: documents,
        seconds: start.elapsed().as_secs_f64(),
        latency_p50_ms: latencies.get(latencies.len() / 2).map_or(0.0, |s| s * 1e3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_pairs_join_questions_and_steps_to_their_paragraphs() {
        let q: Question = serde_json::from_value(serde_json::json!({
            "qid": "a", "question": "Did X do Y?",
            "decomposition": ["Who is X?", "Did #1 do Y?"],
            "evidence": [
                [[["X-1"]], [["Y-2", "X-1"]]],
                [[["X-1"], "operation"], ["no_evidence"]]
            ]
        }))
        .unwrap();
        let pairs = evidence_pairs(&[q.clone(), q]);
        let want = [
            ("Did X do Y?", "X-1"),
            ("Did X do Y?", "Y-2"),
            ("Who is X?", "X-1"),
            ("Did do Y?", "X-1"),
            ("Did do Y?", "Y-2"),
        ];
        let got: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn step_references_are_removed() {
        assert_eq!(
            strip_step_refs("Is #1 greater than #12?"),
            "Is  greater than ?"
        );
        assert_eq!(strip_step_refs("C# is #fun"), "C# is #fun");
    }
}
