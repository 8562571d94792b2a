//! Throughput benchmarks in the style of llama.cpp's `llama-bench`, run through the engine
//! (so they measure the path the agent uses, scheduler and sampling included).
//!
//! - `pp<N>`: prompt processing, N random tokens appended to an empty sequence.
//! - `tg<N>`: generation, N tokens decoded one at a time after BOS (greedy, EOS ignored).
//! - `batched-tg<N>` at parallel P: P sequences generating N tokens each at the same time; aggregate
//!   tokens per second over all of them.

use std::time::Instant;

use serde::Serialize;

use crate::{Engine, GenerateParams, Result};

/// One benchmark's figures over its repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// `pp512`, `tg64`, …
    pub test: String,
    /// Sequences decoded at once.
    pub parallel: usize,
    /// Mean tokens per second (aggregate over sequences).
    pub tokens_per_second: f64,
    /// Standard deviation over repetitions.
    pub stddev: f64,
    /// Repetitions measured (after one warm-up run).
    pub repetitions: usize,
}

/// Runs `pp` for each prompt length, `tg` for each generation length, and batched generation
/// of `batched_tokens` tokens for each parallelism level.
pub fn run_suite(
    engine: &Engine,
    prompt_lengths: &[usize],
    gen_lengths: &[usize],
    parallel: &[usize],
    batched_tokens: usize,
    repetitions: usize,
) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for &n in prompt_lengths {
        results.push(measure(format!("pp{n}"), 1, repetitions, || {
            prompt_processing(engine, n)
        })?);
    }
    for &n in gen_lengths {
        results.push(measure(format!("tg{n}"), 1, repetitions, || {
            generation(engine, n)
        })?);
    }
    for &p in parallel {
        results.push(measure(
            format!("batched-tg{batched_tokens}"),
            p,
            repetitions,
            || batched_generation(engine, p, batched_tokens),
        )?);
    }
    Ok(results)
}

fn measure(
    test: String,
    parallel: usize,
    repetitions: usize,
    mut run: impl FnMut() -> Result<f64>,
) -> Result<BenchResult> {
    run()?; // warm-up
    let samples = (0..repetitions.max(1))
        .map(|_| run())
        .collect::<Result<Vec<f64>>>()?;
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / samples.len() as f64;
    tracing::info!(%test, parallel, mean, "bench");
    Ok(BenchResult {
        test,
        parallel,
        tokens_per_second: mean,
        stddev: var.sqrt(),
        repetitions: samples.len(),
    })
}

/// Pseudo-random token ids, as llama-bench feeds: content does not change the cost.
fn random_tokens(engine: &Engine, n: usize, seed: u64) -> Vec<i32> {
    let n_vocab = engine.info().n_vocab as u64;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % n_vocab) as i32
        })
        .collect()
}

/// Tokens per second of decoding an `n`-token prompt.
pub fn prompt_processing(engine: &Engine, n: usize) -> Result<f64> {
    let seq = engine.sequence()?;
    let tokens = random_tokens(engine, n, n as u64);
    let start = Instant::now();
    seq.append_tokens(tokens).wait()?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn bos(engine: &Engine) -> Result<Vec<i32>> {
    let mut t = engine.tokenize("", true).wait()?;
    if t.is_empty() {
        t = random_tokens(engine, 1, 7);
    }
    Ok(t)
}

/// Tokens per second of generating `n` tokens one by one.
pub fn generation(engine: &Engine, n: usize) -> Result<f64> {
    let seq = engine.sequence()?;
    seq.append_tokens(bos(engine)?).wait()?;
    let params = GenerateParams {
        max_tokens: n + 1,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    // n + 1 samples need n decodes; the first sample uses the prompt's logits.
    let done = seq.generate(params).wait()?;
    Ok(n as f64 / done.generation_seconds)
}

/// Aggregate tokens per second of `parallel` sequences generating `n` tokens each at once.
pub fn batched_generation(engine: &Engine, parallel: usize, n: usize) -> Result<f64> {
    let seqs = (0..parallel)
        .map(|_| engine.sequence())
        .collect::<Result<Vec<_>>>()?;
    for (i, seq) in seqs.iter().enumerate() {
        let mut prompt = bos(engine)?;
        prompt.extend(random_tokens(engine, 16, i as u64));
        seq.append_tokens(prompt).wait()?;
    }
    let params = GenerateParams {
        max_tokens: n + 1,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let start = Instant::now();
    let running: Vec<_> = seqs.iter().map(|s| s.generate(params.clone())).collect();
    for g in running {
        g.wait()?;
    }
    Ok((parallel * n) as f64 / start.elapsed().as_secs_f64())
}
