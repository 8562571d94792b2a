//! StrategyQA train questions turned into gold excavations (`geek data trajectories`).
//!
//! Each decomposition step becomes an AddDecomp; a step with evidence paragraphs becomes a
//! Retrieve whose passage block is what BM25 returns for the sub-question with the gold
//! paragraphs guaranteed among them (cited), and a step marked `operation` / `no_evidence`
//! becomes a SelfAnswer. Facts come from the annotator's `facts`, matched to steps by word
//! overlap; a retrieval step no fact matches takes the gold paragraph's best sentence.

use std::collections::HashSet;

use geek_agent::{GoldAnswer, GoldStep, Trajectory};
use geek_retriever::{Bm25Index, Passage};

use crate::strategyqa::Question;
use crate::Result;

/// Why a question yields no trajectory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// The question has no gold answer (test file).
    NoAnswer,
    /// No decomposition or evidence.
    NoDecomposition,
    /// An intermediate computed step has no fact to state.
    UnstatedStep,
}

/// The gold excavation of `question`, showing `passages` passages per retrieval.
// Longer than 80 lines: maps each gold decomposition step to the agent's action for it (AddDecomp, Retrieve with its cited paragraph, SelfAnswer) in one walk.
pub fn gold_trajectory(
    question: &Question,
    index: &Bm25Index,
    passages: usize,
) -> Result<std::result::Result<Trajectory, Skipped>> {
    let Some(answer) = question.answer else {
        return Ok(Err(Skipped::NoAnswer));
    };
    let n = question.decomposition.len();
    if n == 0 || question.evidence.is_empty() {
        return Ok(Err(Skipped::NoDecomposition));
    }
    // The annotator who gave paragraphs for the most steps.
    let annotator = question
        .evidence
        .iter()
        .filter(|a| a.len() == n)
        .max_by_key(|a| a.iter().filter(|s| !step_ids(s).is_empty()).count());
    let Some(annotator) = annotator else {
        return Ok(Err(Skipped::NoDecomposition));
    };
    let mut unused: Vec<&String> = question.facts.iter().collect();
    let mut steps: Vec<GoldStep> = Vec::with_capacity(n);
    let mut answers: Vec<String> = Vec::with_capacity(n);
    for (i, sub_question) in question.decomposition.iter().enumerate() {
        let ids = step_ids(&annotator[i]);
        let gold: Vec<Passage> = ids
            .iter()
            .filter_map(|id| index.get(id).transpose())
            .collect::<std::result::Result<_, _>>()?;
        let is_last = i + 1 == n;
        let passage_text: String = gold
            .iter()
            .map(|p| p.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let matched = take_best_fact(
            &mut unused,
            sub_question,
            &passage_text,
            if gold.is_empty() { 1 } else { 2 },
        );
        let answer_step = if gold.is_empty() {
            let fact = match matched {
                Some(f) => f,
                None if is_last => if answer { "Yes." } else { "No." }.to_string(),
                None => return Ok(Err(Skipped::UnstatedStep)),
            };
            GoldAnswer::SelfAnswered { fact }
        } else {
            let query = resolve_refs(sub_question, &answers);
            let shown = passages_with_gold(index, &query, &gold, passages, &question.qid, i)?;
            let gold_ids: HashSet<&str> = gold.iter().map(|p| p.id.as_str()).collect();
            let cited: Vec<usize> = shown
                .iter()
                .enumerate()
                .filter(|(_, p)| gold_ids.contains(p.id.as_str()))
                .map(|(k, _)| k + 1)
                .collect();
            let fact = matched.unwrap_or_else(|| best_sentence(&gold, sub_question));
            GoldAnswer::Retrieved {
                passages: shown.into_iter().map(|p| (p.title, p.text)).collect(),
                fact,
                cited,
            }
        };
        answers.push(match &answer_step {
            GoldAnswer::Retrieved { fact, .. } | GoldAnswer::SelfAnswered { fact } => {
                fact.trim_end_matches('.').to_string()
            }
        });
        steps.push(GoldStep {
            sub_question: sub_question.clone(),
            answer: answer_step,
        });
    }
    Ok(Ok(Trajectory {
        question: question.question.clone(),
        steps,
        summary: summary(&question.facts),
        answer,
    }))
}

/// Paragraph ids in one annotator's evidence for one step (markers excluded).
fn step_ids(values: &[serde_json::Value]) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s)
                if s != "operation" && s != "no_evidence" && !out.contains(s) =>
            {
                out.push(s.clone())
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    values.iter().for_each(|v| walk(v, &mut out));
    out
}

/// The agent's reference substitution: `#k` becomes the k-th answer.
fn resolve_refs(text: &str, answers: &[String]) -> String {
    let mut out = text.to_string();
    for (i, a) in answers.iter().enumerate().rev() {
        out = out.replace(&format!("#{}", i + 1), a);
    }
    out
}

/// BM25's passages for `query` with every gold paragraph (at most `k`) among them: gold ones
/// BM25 already ranks stay where they are, missing ones replace the lowest non-gold results at
/// a position fixed by the question and step (so the model cannot learn "always P1").
fn passages_with_gold(
    index: &Bm25Index,
    query: &str,
    gold: &[Passage],
    k: usize,
    qid: &str,
    step: usize,
) -> Result<Vec<Passage>> {
    let k = k.max(1);
    let gold: Vec<&Passage> = gold.iter().take(k).collect();
    let gold_ids: HashSet<&str> = gold.iter().map(|p| p.id.as_str()).collect();
    let mut shown: Vec<Passage> = index.search(query, k)?;
    let missing: Vec<&Passage> = gold
        .iter()
        .filter(|g| !shown.iter().any(|p| p.id == g.id))
        .copied()
        .collect();
    for g in missing {
        if shown.len() >= k {
            let drop = (0..shown.len())
                .rev()
                .find(|&i| !gold_ids.contains(shown[i].id.as_str()))
                .expect("fewer gold passages than slots");
            shown.remove(drop);
        }
        let seed = qid.bytes().fold(step as u64 + 1, |h, b| {
            h.wrapping_mul(31).wrapping_add(b as u64)
        });
        let at = (seed % (shown.len() as u64 + 1)) as usize;
        shown.insert(at, g.clone());
    }
    Ok(shown)
}

const STOP: &[&str] = &[
    "the", "and", "was", "were", "are", "for", "with", "that", "this", "from", "has", "have",
    "had", "not", "but", "its", "his", "her", "their", "they", "what", "which", "who", "how",
    "does", "did", "can", "could", "would", "there", "than", "into", "been", "also", "one",
];

fn words(s: &str) -> HashSet<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .map(|w| w.to_lowercase())
        .filter(|w| w.len() > 2 && !STOP.contains(&w.as_str()))
        .collect()
}

/// Removes and returns the fact that best matches the sub-question (words shared with it count
/// twice) and its evidence, if it scores at least `min`.
fn take_best_fact(
    unused: &mut Vec<&String>,
    sub_question: &str,
    evidence: &str,
    min: usize,
) -> Option<String> {
    let (q, e) = (words(sub_question), words(evidence));
    let (i, score) = unused
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let w = words(f);
            (
                i,
                2 * w.intersection(&q).count() + w.intersection(&e).count(),
            )
        })
        .max_by_key(|&(i, s)| (s, std::cmp::Reverse(i)))?;
    (score >= min).then(|| unused.remove(i).trim().to_string())
}

/// The sentence of the gold paragraphs sharing the most words with the sub-question.
fn best_sentence(gold: &[Passage], sub_question: &str) -> String {
    let q = words(sub_question);
    gold.iter()
        .flat_map(|p| p.text.split_inclusive(". "))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .max_by_key(|s| words(s).intersection(&q).count())
        .map(|s| s.split_whitespace().take(40).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The annotator's facts joined, cut at a sentence end near 45 words.
fn summary(facts: &[String]) -> String {
    let mut out = String::new();
    for f in facts {
        let f = f.trim();
        if !out.is_empty() && out.split_whitespace().count() + f.split_whitespace().count() > 45 {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(f);
    }
    out.split_whitespace()
        .take(60)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_go_to_the_steps_they_overlap() {
        let a = "Llamas have a gestation period of 11 months.".to_string();
        let b = "The Vietnam War lasted 20 years.".to_string();
        let mut unused = vec![&a, &b];
        assert_eq!(
            take_best_fact(&mut unused, "How long did the Vietnam War last?", "", 2).as_deref(),
            Some(b.as_str())
        );
        assert_eq!(take_best_fact(&mut unused, "Who painted it?", "", 1), None);
        assert_eq!(unused.len(), 1);
        assert_eq!(
            resolve_refs(
                "Is #1 longer than #2?",
                &["11 months".into(), "20 years".into()]
            ),
            "Is 11 months longer than 20 years?"
        );
        let ids = step_ids(&[serde_json::json!([["A-1", "B-2"], "operation"])]);
        assert_eq!(ids, vec!["A-1".to_string(), "B-2".to_string()]);
        assert_eq!(
            summary(&["One two.".into(), "Three.".into()]),
            "One two. Three."
        );
    }
}
