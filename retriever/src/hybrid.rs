//! Several retrievers at once, merged by reciprocal rank fusion.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{BoxFuture, Passage, Result, Retriever};

/// Asks every retriever concurrently and fuses their rankings with reciprocal rank fusion:
/// a passage scores Σ 1 / (`rrf_k` + rank) over the lists it appears in. Passages with the same
/// id, or the same title and text, count once.
pub struct HybridRetriever {
    parts: Vec<Arc<dyn Retriever>>,
    weights: Vec<f32>,
    rrf_k: f32,
}

impl HybridRetriever {
    /// Fuses `parts` with equal weights and the usual constant 60.
    pub fn new(parts: Vec<Arc<dyn Retriever>>) -> Self {
        HybridRetriever {
            weights: vec![1.0; parts.len()],
            parts,
            rrf_k: 60.0,
        }
    }

    /// The same, each part's reciprocal ranks multiplied by its weight (missing weights: 1).
    pub fn with_weights(mut self, weights: Vec<f32>) -> Self {
        self.weights = weights;
        self
    }

    /// Fuses ranked lists.
    pub fn fuse(lists: Vec<Vec<Passage>>, rrf_k: f32, k: usize) -> Vec<Passage> {
        HybridRetriever::fuse_weighted(lists, &[], rrf_k, k)
    }

    /// Fuses ranked lists, list `i` weighted by `weights[i]` (1 when missing): a passage
    /// scores Σ weight / (`rrf_k` + rank).
    pub fn fuse_weighted(
        lists: Vec<Vec<Passage>>,
        weights: &[f32],
        rrf_k: f32,
        k: usize,
    ) -> Vec<Passage> {
        let mut fused: Vec<Passage> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (i, list) in lists.into_iter().enumerate() {
            let weight = weights.get(i).copied().unwrap_or(1.0);
            for (rank, p) in list.into_iter().enumerate() {
                let add = weight / (rrf_k + rank as f32 + 1.0);
                let content_key = format!("{}\u{0}{}", p.title.to_lowercase(), p.text.trim());
                let slot = by_key
                    .get(&p.id)
                    .or_else(|| by_key.get(&content_key))
                    .copied();
                match slot {
                    Some(i) => fused[i].score += add,
                    None => {
                        by_key.insert(p.id.clone(), fused.len());
                        by_key.insert(content_key, fused.len());
                        fused.push(Passage {
                            score: add,
                            source: format!("hybrid:{}", p.source),
                            ..p
                        });
                    }
                }
            }
        }
        fused.sort_by(|a, b| b.score.total_cmp(&a.score));
        fused.truncate(k);
        fused
    }
}

impl Retriever for HybridRetriever {
    fn name(&self) -> String {
        let names: Vec<String> = self.parts.iter().map(|p| p.name()).collect();
        format!("hybrid({})", names.join(","))
    }

    fn retrieve<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Passage>>> {
        Box::pin(async move {
            let answers =
                futures::future::join_all(self.parts.iter().map(|p| p.retrieve(query, k))).await;
            let (mut lists, mut weights) = (Vec::new(), Vec::new());
            for (i, (part, answer)) in self.parts.iter().zip(answers).enumerate() {
                match answer {
                    Ok(list) => {
                        lists.push(list);
                        weights.push(self.weights.get(i).copied().unwrap_or(1.0));
                    }
                    Err(e) => {
                        tracing::warn!(retriever = %part.name(), error = %e, "retriever failed; fusing the others")
                    }
                }
            }
            Ok(Self::fuse_weighted(lists, &weights, self.rrf_k, k))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, title: &str, text: &str) -> Passage {
        Passage {
            id: id.into(),
            title: title.into(),
            section: String::new(),
            text: text.into(),
            score: 0.0,
            source: "t".into(),
        }
    }

    #[test]
    fn passages_in_both_lists_rise_and_duplicates_merge() {
        let local = vec![p("a", "A", "x"), p("b", "B", "y"), p("c", "C", "z")];
        let web = vec![p("url-c", "c", "z"), p("d", "D", "w")];
        let fused = HybridRetriever::fuse(vec![local, web], 60.0, 10);
        let ids: Vec<&str> = fused.iter().map(|p| p.id.as_str()).collect();
        // c is in both lists; b and d tie at rank 2 of one list each (insertion order kept).
        assert_eq!(ids, vec!["c", "a", "b", "d"]);
        assert!(fused.iter().all(|p| p.source == "hybrid:t"));
        assert_eq!(
            HybridRetriever::fuse(vec![vec![p("a", "A", "x")]], 60.0, 0).len(),
            0
        );
    }
}
