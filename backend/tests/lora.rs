//! GGUF LoRA adapters loaded with the real model and switched at run time.

mod common;

use std::io::Write;
use std::path::Path;

use common::model_path;
use geek_backend::{Engine, EngineConfig, Error, GenerateParams};

/// Writes a GGUF LoRA adapter (llama.cpp's layout: `lora_a` is [n_in, r], `lora_b` is
/// [r, n_out], ggml order) on `attn_q` of the first `layers` layers, with deterministic values.
fn write_lora(path: &Path, n_embd: u64, n_out: u64, rank: u64, layers: usize) {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let mut tensors = Vec::new();
    for l in 0..layers {
        tensors.push((format!("blk.{l}.attn_q.weight.lora_a"), [n_embd, rank]));
        tensors.push((format!("blk.{l}.attn_q.weight.lora_b"), [rank, n_out]));
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    for (k, v) in [
        ("general.architecture", "llama"),
        ("general.type", "adapter"),
        ("adapter.type", "lora"),
    ] {
        put_str(&mut b, k);
        b.extend_from_slice(&8u32.to_le_bytes());
        put_str(&mut b, v);
    }
    put_str(&mut b, "adapter.lora.alpha");
    b.extend_from_slice(&6u32.to_le_bytes());
    b.extend_from_slice(&(rank as f32).to_le_bytes());
    let mut offset = 0u64;
    for (name, dims) in &tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&dims[0].to_le_bytes());
        b.extend_from_slice(&dims[1].to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (dims[0] * dims[1] * 4).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (i, (_, dims)) in tensors.iter().enumerate() {
        let n = dims[0] * dims[1];
        for j in 0..n {
            let v = (((i as u64 * 7919 + j * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.2;
            b.extend_from_slice(&v.to_le_bytes());
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::File::create(path).unwrap().write_all(&b).unwrap();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn lora_adapters_switch_at_run_time() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("q-lora.gguf");
    // SmolLM2-135M: n_embd 576, attn_q maps 576 -> 576.
    write_lora(&adapter, 576, 576, 4, 30);
    let engine = Engine::load(
        EngineConfig::new(model_path())
            .with_threads(2)
            .with_n_ctx(512)
            .with_lora(&adapter),
    )
    .unwrap();
    assert_eq!(engine.info().lora_adapters, vec![adapter.clone()]);

    let seq = engine.sequence().unwrap();
    seq.append("The capital of France is").wait().unwrap();
    let base = seq.logits().wait().unwrap();

    engine.set_lora(Some(0), 1.0).wait().unwrap();
    // The cached sequence is re-decoded with the adapter's weights.
    let tuned = seq.logits().wait().unwrap();
    assert!(
        max_diff(&base, &tuned) > 0.05,
        "the adapter changed nothing"
    );

    engine.set_lora(Some(0), 0.0).wait().unwrap();
    assert!(max_diff(&base, &seq.logits().wait().unwrap()) < 1e-3);

    engine.set_lora(Some(0), 1.0).wait().unwrap();
    let again = seq.logits().wait().unwrap();
    assert!(
        max_diff(&tuned, &again) < 1e-3,
        "switching back is not reproducible"
    );

    engine.set_lora(None, 1.0).wait().unwrap();
    assert!(max_diff(&base, &seq.logits().wait().unwrap()) < 1e-3);

    assert!(matches!(
        engine.set_lora(Some(3), 1.0).wait(),
        Err(Error::Lora { .. })
    ));
}

#[test]
fn adapters_that_do_not_fit_the_model_are_typed_errors() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let wrong_shape = dir.path().join("wrong.gguf");
    write_lora(&wrong_shape, 100, 100, 2, 1);
    let err = Engine::load(
        EngineConfig::new(model_path())
            .with_threads(2)
            .with_lora(&wrong_shape),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Lora { .. }), "{err}");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not an adapter").unwrap();
    let err = Engine::load(
        EngineConfig::new(model_path())
            .with_threads(2)
            .with_lora(&garbage),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotGguf { .. }), "{err}");
}

/// An engine on SmolLM2 with the test adapter loaded (not switched on).
fn engine_with_adapter(dir: &Path) -> Engine {
    let adapter = dir.join("q-lora.gguf");
    write_lora(&adapter, 576, 576, 4, 30);
    let mut config = EngineConfig::new(model_path())
        .with_threads(2)
        .with_n_ctx(1024)
        .with_lora(&adapter);
    // Prompt-lookup drafts, so that saved logits cover drafted tokens too.
    config.lookup_draft = 4;
    Engine::load(config).unwrap()
}

/// Greedy text after `prompt` on a new sequence pinned to `lora` (not pinned: `None`).
async fn greedy_after(engine: &Engine, prompt: &str, lora: Option<Option<(usize, f32)>>) -> String {
    let seq = engine.sequence().unwrap();
    if let Some(lora) = lora {
        seq.set_lora(lora).await.unwrap();
    }
    seq.append(prompt).await.unwrap();
    seq.generate(GenerateParams::greedy(40))
        .finish()
        .await
        .unwrap()
        .text
}

/// `got`, generated in a batch shared with another sequence, followed the weights that wrote
/// `alone`: it goes on past the point where `alone` and `other` (the other weights' text) part.
/// Past that point a near tie may break otherwise: a different batch composition changes the
/// kernels' summation order, so exact text is not asserted.
fn assert_follows(got: &str, alone: &str, other: &str, what: &str) {
    let shared = |a: &str, b: &str| a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    assert!(
        shared(got, alone) > shared(alone, other),
        "{what} did not follow its weights: {got:?} (alone: {alone:?}, other weights: {other:?})"
    );
}

#[test]
fn sequences_pinned_to_different_adapters_run_together_as_they_run_alone() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with_adapter(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const SCALE: f32 = 1.0;
    // The base model repeats itself after this prompt (so lookup drafts); the adapter does not.
    let prompt = "The capital of France is";

    // The engine's adapter stays off; one sequence is pinned to it.
    let logits_on = |lora: Option<(usize, f32)>| {
        let seq = engine.sequence().unwrap();
        seq.set_lora(lora).wait().unwrap();
        seq.append(prompt).wait().unwrap();
        seq.logits().wait().unwrap()
    };
    assert!(max_diff(&logits_on(None), &logits_on(Some((0, SCALE)))) > 0.05);
    let base_alone = rt.block_on(greedy_after(&engine, prompt, None));
    let tuned_alone = rt.block_on(greedy_after(&engine, prompt, Some(Some((0, SCALE)))));
    assert_ne!(base_alone, tuned_alone, "the adapter changed nothing");
    engine.set_lora(Some(0), SCALE).wait().unwrap();
    let tuned_engine = rt.block_on(greedy_after(&engine, prompt, None));
    assert_eq!(tuned_engine, tuned_alone, "pinning differs from switching");
    let base_pinned = rt.block_on(greedy_after(&engine, prompt, Some(None)));
    assert_eq!(
        base_pinned, base_alone,
        "a sequence pinned to the base model"
    );
    engine.set_lora(None, 1.0).wait().unwrap();

    // Both at once: batches alternate between the two weights.
    let (base, tuned) = rt.block_on(async {
        tokio::join!(
            greedy_after(&engine, prompt, None),
            greedy_after(&engine, prompt, Some(Some((0, SCALE))))
        )
    });
    assert_follows(&base, &base_alone, &tuned_alone, "the base sequence");
    assert_follows(&tuned, &tuned_alone, &base_alone, "the pinned sequence");

    // A multi-token score on a pinned sequence while the base sequence generates.
    let candidates = [" Paris, the city of light", " Lyon, on the Rhône"];
    let score_on = |lora: Option<(usize, f32)>| {
        let engine = &engine;
        async move {
            let seq = engine.sequence().unwrap();
            seq.set_lora(lora).await.unwrap();
            seq.append(prompt).await.unwrap();
            seq.score(&candidates).await.unwrap()
        }
    };
    let alone = rt.block_on(score_on(Some((0, SCALE))));
    let (base_again, together) = rt.block_on(async {
        tokio::join!(
            greedy_after(&engine, prompt, None),
            score_on(Some((0, SCALE)))
        )
    });
    assert_follows(&base_again, &base_alone, &tuned_alone, "the base sequence");
    for (a, b) in alone.iter().zip(&together) {
        assert!((a - b).abs() < 1e-3, "{alone:?} against {together:?}");
    }
    let stats = engine.stats().wait().unwrap();
    assert!(stats.drafted_tokens > 0, "nothing was drafted: {stats:?}");

    // A switch of the engine's adapter leaves a pinned sequence's cache alone.
    let pinned = engine.sequence().unwrap();
    pinned.set_lora(Some((0, SCALE))).wait().unwrap();
    pinned.append(prompt).wait().unwrap();
    let before = pinned.logits().wait().unwrap();
    engine.set_lora(Some(0), 0.5).wait().unwrap();
    assert!(max_diff(&before, &pinned.logits().wait().unwrap()) < 1e-3);
    assert!(matches!(
        pinned.set_lora(Some((2, 1.0))).wait(),
        Err(Error::Lora { .. })
    ));
}
