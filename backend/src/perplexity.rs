//! Perplexity the way llama.cpp's `llama-perplexity` computes it: the text is tokenized once,
//! cut into non-overlapping chunks of `n_ctx` tokens (the first token of each chunk replaced by
//! BOS when the model uses one), and only the second half of each chunk is scored, so every
//! scored token sees at least `n_ctx/2` tokens of context.

use std::time::Instant;

use serde::Serialize;

use crate::{Engine, Error, Result};

/// The outcome of [`perplexity`].
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// Tokens scored.
    pub scored: usize,
    /// Running perplexity after each chunk (llama-perplexity's `[i]` values).
    pub running: Vec<f64>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Perplexity of `engine`'s model on `text` with chunks of `n_ctx` tokens, at most `max_chunks`
/// of them (all when `None`). The engine's context must hold `n_ctx` tokens.
pub fn perplexity(
    engine: &Engine,
    text: &str,
    n_ctx: usize,
    max_chunks: Option<usize>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    if n_ctx < 16 {
        return Err(Error::InvalidParameter(format!(
            "perplexity needs chunks of at least 16 tokens, not {n_ctx}"
        )));
    }
    let started = Instant::now();
    let text = text.replace("\r\n", "\n");
    let tokens = engine.tokenize(text, true).wait()?;
    let bos = engine.tokenize("", true).wait()?.first().copied();
    let available = tokens.len() / n_ctx;
    let chunks = max_chunks.map_or(available, |m| m.min(available));
    if chunks == 0 {
        return Err(Error::InvalidParameter(format!(
            "the text has {} tokens: fewer than one chunk of {n_ctx}",
            tokens.len()
        )));
    }
    let first = n_ctx / 2;
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut running = Vec::with_capacity(chunks);
    for c in 0..chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let lp = engine.token_log_probs(chunk, first).wait()?;
        nll -= lp.iter().map(|&x| x as f64).sum::<f64>();
        scored += lp.len();
        let ppl = (nll / scored as f64).exp();
        running.push(ppl);
        on_chunk(c + 1, chunks, ppl);
    }
    Ok(Perplexity {
        ppl: (nll / scored as f64).exp(),
        nll: nll / scored as f64,
        chunks,
        n_ctx,
        scored,
        running,
        seconds: started.elapsed().as_secs_f64(),
    })
}
