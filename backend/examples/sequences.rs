//! The backend in five moves: load a model, keep a sequence, fork it, score candidates,
//! generate under a grammar.
//!
//! ```sh
//! cargo run --release -p geek-backend --example sequences
//! ```
//!
//! Needs the test model (`geek model pull smollm2-135m-instruct-q4_1`) or any GGUF in
//! `GEEK_MODEL`.

use geek_backend::{catalog, paths, Engine, EngineConfig, GenerateParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Load: one engine thread owns the model; `Engine` is a cheap handle to it.
    let model = match std::env::var_os("GEEK_MODEL") {
        Some(path) => path.into(),
        None => catalog::resolve(catalog::test_model().name, &paths::models_dir(None))?,
    };
    let engine = Engine::load(EngineConfig::new(model).with_threads(2))?;
    println!(
        "{} ({} layers)",
        engine.info().architecture,
        engine.info().n_layer
    );

    // 2. Keep a sequence: appends decode only their new tokens; the rest stays cached.
    let seq = engine.sequence()?;
    let first = seq.append("The llama is a domesticated camelid.").wait()?;
    let second = seq.append_text(" Its gestation lasts about").wait()?;
    println!(
        "decoded {} then {} new tokens ({} reused)",
        first.decoded, second.decoded, second.reused
    );

    // 3. Fork: a copy that shares the cache cells, for exploring two continuations.
    let other = seq.fork().wait()?;
    other.append_text(" a fortnight").wait()?;

    // 4. Score: log-probabilities of candidate continuations, without generating.
    let scores = seq.score(&[" 11 months", " 2 weeks"]).wait()?;
    println!(
        "log p(11 months) {:.2}, log p(2 weeks) {:.2}",
        scores[0], scores[1]
    );

    // 5. Generate: greedy, stopped at the end of the line, constrained by a GBNF grammar.
    let done = seq
        .generate(
            GenerateParams::greedy(16)
                .stop_at("\n")
                .with_grammar("root ::= [^\\n]+ \"\\n\""),
        )
        .wait()?;
    println!("generated {:?} ({} tokens)", done.text, done.tokens.len());
    Ok(())
}
