//! Recall@10 of the real BM25 index on the real StrategyQA dev split and default corpus.

use std::path::PathBuf;

use geek_evals::retrieval::{evaluate, QueryMode};
use geek_evals::strategyqa::{self, Split};
use geek_retriever::{Bm25Index, CorpusSource};

fn data_dir() -> PathBuf {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    std::env::var_os("GEEK_DATA_DIR").map_or(default, PathBuf::from)
}

#[test]
fn dev_recall_reaches_the_bm25s_baseline() {
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let index = Bm25Index::build(dir.path(), &CorpusSource::defaults(&data)).unwrap();
    assert_eq!(index.meta().documents, 19284);
    let dev = strategyqa::load(&Split::Dev.path(&data)).unwrap();
    assert_eq!(dev.len(), 229);
    // bm25s 0.3.16 on the same corpus: 0.822 (question) and 0.862 (decomposition).
    let search = |q: &str, k: usize| index.search(q, k);
    let n = index.meta().documents;
    let q = evaluate(&search, n, &dev, QueryMode::Question, 10).unwrap();
    assert!(q.recall >= 0.822, "question Recall@10 {}", q.recall);
    let d = evaluate(&search, n, &dev, QueryMode::Decomposition, 10).unwrap();
    assert!(d.recall >= 0.862, "decomposition Recall@10 {}", d.recall);
    assert_eq!(q.scored, 229);
}
