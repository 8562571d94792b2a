//! The candle BERT encoder against sentence-transformers' own embeddings of the fixture's
//! sentences (`tests/fixtures/make_minilm_fixture.py` wrote them).

use std::path::PathBuf;

use geek_retriever::dense::Encoder;

/// The all-MiniLM-L6-v2 directory `geek model pull all-minilm-l6-v2` writes
/// (`$GEEK_ENCODER_DIR` overrides). Missing is a failure.
fn encoder_dir() -> PathBuf {
    let dir = std::env::var_os("GEEK_ENCODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            std::env::var_os("GEEK_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/geek/models"))
                .join("encoders/all-minilm-l6-v2")
        });
    assert!(
        dir.join("model.safetensors").is_file(),
        "encoder {} missing: run `geek model pull all-minilm-l6-v2`",
        dir.display()
    );
    dir
}

#[test]
fn the_encoder_matches_sentence_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_embeddings.json")).unwrap();
    let sentences: Vec<&str> = fixture["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let expected: Vec<Vec<f32>> = serde_json::from_value(fixture["embeddings"].clone()).unwrap();
    let encoder = Encoder::load(&encoder_dir()).unwrap();
    assert_eq!(encoder.dim(), 384);
    // In one padded batch, and one by one: padding must not change an embedding.
    let batched: Vec<Vec<f32>> = encoder.encode(&sentences).unwrap().to_vec2().unwrap();
    let mut worst = 1.0f32;
    for (i, (s, want)) in sentences.iter().zip(&expected).enumerate() {
        let alone: Vec<f32> = encoder.encode(&[s]).unwrap().to_vec2().unwrap().remove(0);
        for got in [&batched[i], &alone] {
            let cos: f32 = got.iter().zip(want).map(|(a, b)| a * b).sum();
            worst = worst.min(cos);
            assert!(cos >= 0.999, "sentence {i} ({s:?}): cosine {cos}");
        }
    }
    eprintln!("lowest cosine with sentence-transformers over 20 sentences: {worst:.6}");
}

/// A small corpus of distinct topics, as JSONL.
fn corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let passages = [
        ("Llama", "The llama is a domesticated South American camelid; its gestation lasts about 11.5 months."),
        ("Vietnam War", "The Vietnam War was fought in Vietnam, Laos and Cambodia from 1955 to 1975."),
        ("Paris", "Paris is the capital of France, on the Seine."),
        ("Photosynthesis", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
        ("Mount Everest", "Everest, in the Himalayas, is the highest mountain above sea level."),
        ("Aristotle", "Aristotle was a Greek philosopher of the fourth century BC."),
        ("Laptop", "Portable computers, laptops, became common in the 1980s and 1990s."),
        ("Reddit", "Reddit is a social news website; it is not traded on the stock exchange."),
    ];
    let path = dir.join("corpus.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let (title, text) = passages[i % passages.len()];
            serde_json::json!({"id": format!("{title}-{i}"), "title": title, "text": format!("{text} (copy {i})")})
                .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn a_dense_store_builds_resumes_finds_and_refuses_when_stale() {
    use geek_retriever::dense::{build, store_dir, DenseIndex};
    use geek_retriever::{Bm25Index, CorpusSource, Error};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let index_dir = dir.path().join("index");
    let source = CorpusSource::from_path(corpus(dir.path()));
    let index = Arc::new(Bm25Index::build(&index_dir, std::slice::from_ref(&source)).unwrap());
    let encoder = Arc::new(Encoder::load(&encoder_dir()).unwrap());
    // Unbuilt: refused with the command that builds it.
    let err = DenseIndex::open(index.clone(), encoder.clone())
        .err()
        .unwrap();
    assert!(err.to_string().contains("geek index embed"), "{err}");

    let mut seen = Vec::new();
    let store = build(&index, &encoder, &mut |p| seen.push(p.done)).unwrap();
    assert_eq!(store, store_dir(&index_dir, &encoder));
    assert_eq!((seen[0], *seen.last().unwrap()), (0, 40));
    let full = std::fs::read(store.join("embeddings.f32")).unwrap();

    // A build stopped after its first batch, with half a batch written after it, resumes
    // from the first batch and ends with the same bytes.
    let meta_path = store.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["done"] = 32.into();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    std::fs::write(store.join("embeddings.f32"), &full[..(32 + 4) * 384 * 4]).unwrap();
    let mut resumed = Vec::new();
    build(&index, &encoder, &mut |p| resumed.push(p.done)).unwrap();
    assert_eq!(resumed, vec![32, 40]);
    let again = std::fs::read(store.join("embeddings.f32")).unwrap();
    let diff = full
        .chunks_exact(4)
        .zip(again.chunks_exact(4))
        .map(|(a, b)| {
            let f = |x: &[u8]| f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            (f(a) - f(b)).abs()
        })
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "resumed embeddings differ by {diff}");

    let dense = DenseIndex::open(index.clone(), encoder.clone()).unwrap();
    let hits = dense.search("How long is a llama pregnant?", 3).unwrap();
    assert_eq!(hits[0].title, "Llama", "{hits:?}");
    assert!(hits[0].score > hits[2].score || hits[2].title == "Llama");
    assert_eq!(hits[0].source, "dense");

    // The index rebuilt: the store no longer fits it.
    drop(dense);
    let rebuilt = Arc::new(Bm25Index::build(&index_dir, &[source]).unwrap());
    match DenseIndex::open(rebuilt, encoder) {
        Err(Error::DenseStale { reason, .. }) => assert!(reason.contains("rebuilt"), "{reason}"),
        other => panic!("expected a stale store, got {:?}", other.err()),
    }
}
