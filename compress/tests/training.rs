//! Training, resuming and exporting adapters on the real SmolLM2 model, and serving the result
//! through llama.cpp.

mod common;

use common::model_path;

use geek_backend::{Engine, EngineConfig};
use geek_compress::data::{tokenize, Example, Tokenized};
use geek_compress::export::{
    load_adapter, save_adapter, write_gguf_lora, write_merged_gguf, write_peft, FloatType,
};
use geek_compress::train::{finetune, TrainConfig};
use geek_compress::{AdapterConfig, AdapterKind, BaseWeights, Error};

fn examples(engine: &Engine) -> Vec<Tokenized> {
    let facts = [
        (
            "Could a llama give birth twice during the Vietnam War?",
            "yes",
        ),
        ("Is the Eiffel Tower taller than a giraffe?", "yes"),
        ("Can a penguin fly to the Moon?", "no"),
        ("Did Shakespeare use a smartphone?", "no"),
        ("Is water wet at room temperature?", "yes"),
        ("Would a snowman survive a summer in Cairo?", "no"),
    ];
    let ex: Vec<Example> = facts
        .iter()
        .map(|(q, a)| Example {
            prompt: format!("Question: {q}\n"),
            completion: format!("Action: FinalAnswer\nSummary: The facts settle it.\nAnswer: {a}"),
            context: Vec::new(),
        })
        .collect();
    tokenize(engine, &ex).unwrap()
}

fn small(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 2,
        accumulation: 2,
        seq_len: 96,
        lr: 3e-3,
        warmup: 1,
        checkpoint_every: 2,
        holdout: 2,
        ..TrainConfig::default()
    }
}

/// The model file, its f32 weights and the six examples tokenized by llama.cpp.
fn setup() -> (std::path::PathBuf, BaseWeights, Vec<Tokenized>) {
    let path = model_path();
    let engine = Engine::load(EngineConfig::new(&path).with_threads(2).with_n_ctx(512)).unwrap();
    let data = examples(&engine);
    drop(engine);
    let base = BaseWeights::load(&path).unwrap();
    (path, base, data)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_adapter_learns_and_a_killed_run_resumes_to_the_same_weights() {
    let _one = common::one_model_at_a_time();
    let (_, base, data) = setup();
    let mut counts = Vec::new();
    for kind in AdapterKind::ALL {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = AdapterConfig::new(kind);
        cfg.rank = 8;
        let (_, summary) =
            finetune(&base, &cfg, &data, &small(6), dir.path(), &mut |_| {}).unwrap();
        let first = summary.history.first().unwrap().loss;
        let last = summary.history.last().unwrap().loss;
        assert!(last < first * 0.8, "{kind:?}: loss {first} -> {last}");
        counts.push((kind, summary.trainable));
    }
    // LoRA r=8 on all seven matrices of 30 blocks.
    assert_eq!(
        counts[0].1,
        30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    );
    assert!(
        counts[1].1 == counts[0].1 + 30 * 7 * 64,
        "MoSLoRA adds r² per matrix"
    );
    assert!(
        counts[2].1 * 5 < counts[0].1,
        "LoRETTA_rep is far smaller: {counts:?}"
    );

    // Resume: 2 steps, "killed", then 4 in all == 4 straight.
    let cfg = AdapterConfig::new(AdapterKind::Lora);
    let straight = tempfile::tempdir().unwrap();
    let (a, _) = finetune(&base, &cfg, &data, &small(4), straight.path(), &mut |_| {}).unwrap();
    let resumed = tempfile::tempdir().unwrap();
    finetune(&base, &cfg, &data, &small(2), resumed.path(), &mut |_| {}).unwrap();
    let mut started_at = None;
    let (b, s) = finetune(&base, &cfg, &data, &small(4), resumed.path(), &mut |e| {
        if let geek_compress::train::TrainEvent::Started { start_step, .. } = e {
            started_at = Some(*start_step);
        }
    })
    .unwrap();
    assert_eq!(started_at, Some(2));
    assert_eq!(s.history.len(), 4);
    for ((n, x), (_, y)) in a.named_vars().iter().zip(b.named_vars().iter()) {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_diff(&x, &y) < 1e-6, "{n}");
    }
    // Another adapter on the same directory is refused, not mixed in.
    let mut other = cfg.clone();
    other.rank = 4;
    match finetune(&base, &other, &data, &small(4), resumed.path(), &mut |_| {}) {
        Err(Error::CheckpointMismatch { .. }) => {}
        r => panic!("expected a mismatch, got {:?}", r.map(|_| ())),
    }
}

#[test]
fn merged_and_runtime_lora_ggufs_serve_what_candle_computes() {
    let _one = common::one_model_at_a_time();
    let (path, base, data) = setup();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AdapterConfig::new(AdapterKind::Moslora);
    cfg.rank = 8;
    let (model, _) = finetune(&base, &cfg, &data, &small(4), dir.path(), &mut |_| {}).unwrap();
    save_adapter(&model, &base, &dir.path().join("adapter")).unwrap();
    let model = load_adapter(&base, &dir.path().join("adapter")).unwrap();
    let merged = dir.path().join("merged.gguf");
    let lora = dir.path().join("lora.gguf");
    write_merged_gguf(&model, &base, &merged, FloatType::F32).unwrap();
    write_gguf_lora(&model, &base, &lora).unwrap();
    write_peft(&model, &base, &dir.path().join("peft")).unwrap();
    assert!(dir.path().join("peft/adapter_model.safetensors").is_file());

    let prompt =
        "Question: Is the Eiffel Tower taller than a giraffe?\nAction: FinalAnswer\nSummary:";
    let merged_engine =
        Engine::load(EngineConfig::new(&merged).with_threads(2).with_n_ctx(512)).unwrap();
    let tokens = merged_engine.tokenize(prompt, true).wait().unwrap();
    let seq = merged_engine.sequence().unwrap();
    seq.append_tokens(tokens.clone()).wait().unwrap();
    let from_merged = seq.logits().wait().unwrap();
    drop(seq);
    drop(merged_engine);

    let config = EngineConfig::new(&path)
        .with_threads(2)
        .with_n_ctx(512)
        .with_lora(&lora);
    let lora_engine = Engine::load(config).unwrap();
    lora_engine.set_lora(Some(0), 1.0).wait().unwrap();
    let seq = lora_engine.sequence().unwrap();
    seq.append_tokens(tokens.clone()).wait().unwrap();
    let from_lora = seq.logits().wait().unwrap();

    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let ours: Vec<Vec<f32>> = model.sequence_logits(&ids).unwrap().to_vec2().unwrap();
    let from_candle = ours.last().unwrap();
    let spread = |v: &[f32]| {
        v.iter().cloned().fold(f32::MIN, f32::max) - v.iter().cloned().fold(f32::MAX, f32::min)
    };
    // Merged f32 vs base Q4_1 + f32 LoRA: the base's quantized matmuls differ slightly.
    let tol = 0.03 * spread(from_candle);
    assert!(
        max_diff(&from_merged, &from_lora) < tol,
        "{}",
        max_diff(&from_merged, &from_lora)
    );
    assert!(
        max_diff(&from_merged, from_candle) < tol,
        "{}",
        max_diff(&from_merged, from_candle)
    );
    // And the adapter matters: the base model alone disagrees more.
    lora_engine.set_lora(None, 0.0).wait().unwrap();
    let seq = lora_engine.sequence().unwrap();
    seq.append_tokens(tokens).wait().unwrap();
    let from_base = seq.logits().wait().unwrap();
    assert!(max_diff(&from_base, from_candle) > max_diff(&from_lora, from_candle));

    // LoRETTA_adp says why it cannot be folded.
    let mut adp = AdapterConfig::new(AdapterKind::LorettaAdp);
    adp.rank = 8;
    let (adp_model, _) = finetune(
        &base,
        &adp,
        &data,
        &small(1),
        &dir.path().join("adp"),
        &mut |_| {},
    )
    .unwrap();
    match write_gguf_lora(&adp_model, &base, &dir.path().join("adp.gguf")) {
        Err(Error::NotExportable(msg)) => assert!(msg.contains("cannot be folded")),
        r => panic!("{:?}", r.map(|_| ())),
    }
}

/// Mean cross-entropy of the completions of `data`, each run whole through the full model.
fn completion_loss(model: &geek_compress::model::AdaptedModel, data: &[Tokenized]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for ex in data {
        let logits: Vec<Vec<f32>> = model
            .sequence_logits(&ex.tokens)
            .unwrap()
            .to_vec2()
            .unwrap();
        for p in ex.prompt_len.max(1)..ex.tokens.len() {
            let logp = common::log_softmax(&logits[p - 1]);
            sum -= logp[ex.tokens[p] as usize];
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn a_top_layers_adapter_trains_from_the_cached_lower_layers() {
    let _one = common::one_model_at_a_time();
    let (_, base, data) = setup();
    let mut cfg = AdapterConfig::new(AdapterKind::Lora);
    cfg.top_layers = 3;
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        eval_every: 3,
        ..small(6)
    };
    let (model, summary) = finetune(&base, &cfg, &data, &config, dir.path(), &mut |_| {}).unwrap();
    // Only the top 3 of SmolLM2's 30 layers carry adapters.
    let vars = model.named_vars();
    assert!(!vars.is_empty());
    assert!(vars.iter().all(|(n, _)| ["blk.27.", "blk.28.", "blk.29."]
        .iter()
        .any(|p| n.starts_with(p))));
    // The held-out losses read from the cached streams are the full model's.
    let heldout = &data[data.len() - config.holdout..];
    let untrained = geek_compress::model::AdaptedModel::new(&base, Some(&cfg)).unwrap();
    let initial = summary.initial_heldout_loss.unwrap();
    let reference = completion_loss(&untrained, heldout);
    // (f32 sums in training, f64 here.)
    assert!(
        (initial - reference).abs() < 1e-3,
        "{initial} vs {reference}"
    );
    assert!((summary.heldout_loss - completion_loss(&model, heldout)).abs() < 1e-3);
    assert!(summary.stream_cache_bytes > 0);
    let first = summary.history.first().unwrap().loss;
    let last = summary.history.last().unwrap().loss;
    assert!(last < first * 0.8, "loss {first} -> {last}");
}
