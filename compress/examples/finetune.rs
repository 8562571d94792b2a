//! Fine-tune a LoRA adapter for a few steps on the CPU and export it as a GGUF LoRA that
//! llama.cpp loads beside the base model.
//!
//! ```sh
//! cargo run --release -p geek-compress --example finetune
//! ```
//!
//! Needs the test model (`geek model pull smollm2-135m-instruct-q4_1`); takes about a minute.

use geek_backend::{catalog, paths, Engine, EngineConfig};
use geek_compress::data::{tokenize, Example};
use geek_compress::export::write_gguf_lora;
use geek_compress::train::{finetune, TrainConfig, TrainEvent};
use geek_compress::{AdapterConfig, AdapterKind, BaseWeights, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = catalog::resolve(catalog::test_model().name, &paths::models_dir(None))?;

    // 1. Data: (prompt, completion) pairs; the loss covers the completions only. The backend
    //    tokenizes them, so training sees the tokens serving will.
    let examples: Vec<Example> = (0..12)
        .map(|i| Example {
            prompt: format!("Question: Is {i} even?\nAnswer:"),
            completion: if i % 2 == 0 { " yes" } else { " no" }.into(),
            context: Vec::new(),
        })
        .collect();
    let tokenizer = Engine::load(EngineConfig::new(&model).with_n_ctx(512).with_threads(2))?;
    let data = tokenize(&tokenizer, &examples)?;

    // 2. Train: the base weights dequantized to f32, a rank-4 LoRA on the attention
    //    projections, AdamW with warm-up; checkpoints go to `out` and a rerun resumes.
    let base = BaseWeights::load(&model)?;
    let adapter = AdapterConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec![Target::Q, Target::V],
        ..AdapterConfig::new(AdapterKind::Lora)
    };
    let config = TrainConfig {
        steps: 3,
        batch: 2,
        accumulation: 1,
        seq_len: 64,
        lr: 1e-3,
        warmup: 1,
        holdout: 2,
        ..TrainConfig::default()
    };
    let out = tempfile::tempdir()?;
    let (trained, summary) = finetune(&base, &adapter, &data, &config, out.path(), &mut |e| {
        if let TrainEvent::Step { step, loss, .. } = e {
            println!("step {step}: loss {loss:.3}");
        }
    })?;
    println!(
        "held-out loss {:?} -> {:.3}",
        summary.initial_heldout_loss, summary.heldout_loss
    );

    // 3. Export: a GGUF LoRA (`--lora` at serving time), beside merged GGUF and PEFT forms.
    let lora = out.path().join("adapter.gguf");
    write_gguf_lora(&trained, &base, &lora)?;
    println!("GGUF LoRA: {} bytes", std::fs::metadata(&lora)?.len());
    Ok(())
}
