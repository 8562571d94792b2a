//! StrategyQA's official retrieval metric.
//!
//! Recall@k of a question: for each annotator, the share of that annotator's gold paragraph
//! ids (all steps, `operation` / `no_evidence` steps excluded) found among the first k
//! retrieved ids; the question scores its best-matching annotator. Annotators with no gold
//! paragraph are not counted; a question none of whose annotators has any is left out of the
//! average.

/// Recall@k for one question, or `None` when no annotator has gold paragraphs.
pub fn recall_at_k(
    retrieved: &[String],
    gold_per_annotator: &[Vec<String>],
    k: usize,
) -> Option<f64> {
    let top = &retrieved[..retrieved.len().min(k)];
    gold_per_annotator
        .iter()
        .filter(|gold| !gold.is_empty())
        .map(|gold| gold.iter().filter(|g| top.contains(g)).count() as f64 / gold.len() as f64)
        .fold(None, |best: Option<f64>, r| {
            Some(best.map_or(r, |b| b.max(r)))
        })
}

/// Mean over the questions that have gold paragraphs, and how many those were.
pub fn mean_recall(per_question: &[Option<f64>]) -> (f64, usize) {
    let scored: Vec<f64> = per_question.iter().flatten().copied().collect();
    if scored.is_empty() {
        return (0.0, 0);
    }
    (
        scored.iter().sum::<f64>() / scored.len() as f64,
        scored.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn best_annotator_counts_and_k_cuts() {
        let gold = vec![s(&["a", "b"]), s(&["c"]), vec![]];
        assert_eq!(recall_at_k(&s(&["a", "x"]), &gold, 10), Some(0.5));
        assert_eq!(recall_at_k(&s(&["x", "c"]), &gold, 10), Some(1.0));
        assert_eq!(recall_at_k(&s(&["x", "c"]), &gold, 1), Some(0.0));
        assert_eq!(recall_at_k(&s(&["a"]), &[vec![]], 10), None);
        assert_eq!(mean_recall(&[Some(1.0), None, Some(0.5)]), (0.75, 2));
    }
}
