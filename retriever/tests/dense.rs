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
