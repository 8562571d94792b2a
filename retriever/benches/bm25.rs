//! Criterion benchmarks of the local BM25 index on the default corpus (StrategyQA paragraphs +
//! vital-article summaries): building it, and answering StrategyQA dev questions.
//!
//! `cargo bench -p geek-retriever` (data from `GEEK_DATA_DIR`, default `../shared/data`).
#![allow(missing_docs)]

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use geek_retriever::{corpus, Bm25Index, CorpusSource};

fn data_dir() -> PathBuf {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    std::env::var_os("GEEK_DATA_DIR").map_or(default, PathBuf::from)
}

fn dev_questions() -> Vec<String> {
    let path = data_dir().join("strategyqa/dev.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|q| q["question"].as_str().unwrap().to_string())
        .collect()
}

fn bench(c: &mut Criterion) {
    let sources = CorpusSource::defaults(&data_dir());
    let docs = corpus::load_all(&sources).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut build = c.benchmark_group("build");
    build.sample_size(10);
    build.bench_function("default_corpus", |b| {
        b.iter(|| Bm25Index::build_from_documents(dir.path(), &docs, sources.clone()).unwrap())
    });
    build.finish();

    let index = Bm25Index::open(dir.path()).unwrap();
    let questions = dev_questions();
    let mut i = 0;
    c.bench_function("query_top10", |b| {
        b.iter(|| {
            i = (i + 1) % questions.len();
            index.search(&questions[i], 10).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
