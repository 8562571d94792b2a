//! Shared by the integration tests: where the real model is, and one model at a time.
#![allow(dead_code)] // each test file uses part of it

use std::path::PathBuf;

use geek_backend::catalog;

/// The PyPI-shipped SmolLM2 GGUF (`$GEEK_TEST_MODEL` overrides). Missing is a failure.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("GEEK_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            geek_backend::paths::models_dir(None).join(catalog::test_model().file_name)
        });
    assert!(
        path.is_file(),
        "test model {} missing: run `geek model pull`",
        path.display()
    );
    path
}

/// The default model users get (Qwen2.5-Coder-1.5B, pulled by `geek model pull`). Missing is
/// a failure.
pub fn default_model_path() -> PathBuf {
    let path = geek_backend::paths::models_dir(None).join(catalog::default_model().file_name);
    assert!(
        path.is_file(),
        "{} missing: run `geek model pull`",
        path.display()
    );
    path
}

/// Serialises the tests of one binary that run a model: llama.cpp and candle both want the
/// two cores. Hold the guard for the whole test.
pub fn one_model_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Log-softmax of logits, in f64.
pub fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// Mean KL(llama.cpp ‖ candle) and top-1 agreement of the next-token predictions of `engine`
/// (token by token in a fresh sequence) and `model` over `ids`.
pub fn agreement(
    engine: &geek_backend::Engine,
    model: &geek_compress::AdaptedModel,
    ids: &[u32],
) -> (f64, f64) {
    let per_position = agreement_by_position(engine, model, ids);
    let n = per_position.len() as f64;
    let kl = per_position.iter().map(|p| p.0).sum::<f64>() / n;
    let top1 = per_position.iter().filter(|p| p.1).count() as f64 / n;
    (kl, top1)
}

/// Per position of `ids`: KL(llama.cpp ‖ candle) of the next-token predictions, and whether
/// their most likely tokens agree.
pub fn agreement_by_position(
    engine: &geek_backend::Engine,
    model: &geek_compress::AdaptedModel,
    ids: &[u32],
) -> Vec<(f64, bool)> {
    let ours: Vec<Vec<f32>> = model.sequence_logits(ids).unwrap().to_vec2().unwrap();
    let seq = engine.sequence().unwrap();
    let mut out = Vec::with_capacity(ids.len());
    for (pos, &tok) in ids.iter().enumerate() {
        seq.append_tokens(vec![tok as i32]).wait().unwrap();
        let theirs = seq.logits().wait().unwrap();
        let (p, q) = (log_softmax(&theirs), log_softmax(&ours[pos]));
        let kl = p
            .iter()
            .zip(&q)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        let argmax = |v: &[f64]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
        out.push((kl, argmax(&p) == argmax(&q)));
    }
    out
}

/// Token ids of `text` by the model's own tokenizer (with BOS etc. when `add_special`).
pub fn token_ids(engine: &geek_backend::Engine, text: &str, add_special: bool) -> Vec<u32> {
    engine
        .tokenize(text, add_special)
        .wait()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect()
}
