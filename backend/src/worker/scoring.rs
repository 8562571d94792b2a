//! Scoring outside the main loop: candidate continuations and token log-probabilities on
//! scratch sequences.

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

use super::adapters::Lora;
use super::Worker;
use crate::sampling::log_probs;
use crate::{Error, Result};

impl Worker<'_> {
    /// Decodes a batch built outside the main loop (scoring, token log-probs) on `lora`'s
    /// weights, counting it. The logits generating jobs wait on are saved first.
    pub(super) fn decode_side_batch(&mut self, batch: &mut LlamaBatch, lora: Lora) -> Result<()> {
        self.save_batch_logits();
        self.apply_lora(lora)?;
        self.ctx.decode(batch).map_err(|e| match e {
            DecodeError::NoKvCacheSlot => Error::KvCacheFull { n_ctx: self.n_ctx },
            other => Error::Decode(other.to_string()),
        })?;
        self.stats.decode_calls += 1;
        self.stats.batch_tokens += batch.n_tokens() as u64;
        Ok(())
    }

    /// See [`crate::Engine::token_log_probs`].
    pub(super) fn token_log_probs(&mut self, tokens: &[i32], from: usize) -> Result<Vec<f32>> {
        if tokens.len() > self.n_ctx {
            return Err(Error::ContextOverflow {
                needed: tokens.len(),
                limit: self.n_ctx,
            });
        }
        let n_vocab = self.model.n_vocab();
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(Error::InvalidParameter(format!(
                "token id {bad} is not in the vocabulary"
            )));
        }
        let tmp = self.ids.alloc()?;
        let result = (|| -> Result<Vec<f32>> {
            let mut out = Vec::with_capacity(tokens.len().saturating_sub(from + 1));
            let mut batch = LlamaBatch::new(self.n_batch, 1);
            let last = tokens.len().saturating_sub(1);
            for start in (0..tokens.len()).step_by(self.n_batch) {
                let end = (start + self.n_batch).min(tokens.len());
                batch.clear();
                let mut wanted = Vec::new();
                for (pos, &tok) in tokens.iter().enumerate().take(end).skip(start) {
                    let logits = pos >= from && pos < last;
                    if logits {
                        wanted.push((pos, batch.n_tokens()));
                    }
                    batch
                        .add(LlamaToken(tok), pos as i32, &[tmp], logits)
                        .map_err(|e| Error::Decode(e.to_string()))?;
                }
                self.decode_side_batch(&mut batch, self.engine_lora)?;
                for (pos, index) in wanted {
                    out.push(log_probs(self.ctx.get_logits_ith(index), &[tokens[pos + 1]])[0]);
                }
            }
            Ok(out)
        })();
        let _ = self.ctx.clear_kv_cache_seq(Some(tmp as u32), None, None);
        self.ids.release(tmp);
        result
    }

    /// Log-probabilities of candidate continuations of a sequence whose logits are stored.
    /// Single-token candidates need no decoding; longer ones are decoded together on scratch
    /// sequences that share the prompt's cache cells.
    pub(super) fn score(&mut self, seq: i32, cands: &[Vec<LlamaToken>]) -> Result<Vec<f32>> {
        let state = self.seqs.get(&seq).ok_or(Error::EngineStopped)?;
        let base = state.last_logits.as_ref().ok_or(Error::EngineStopped)?;
        let len = state.tokens.len();
        let mut scores: Vec<f32> = cands
            .iter()
            .map(|c| log_probs(base, &[c[0].0])[0])
            .collect();
        let multi: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].len() > 1).collect();
        if multi.is_empty() {
            return Ok(scores);
        }
        let mut scratch_ids = Vec::new();
        let result = (|| -> Result<()> {
            let total: usize = multi.iter().map(|&i| cands[i].len() - 1).sum();
            let mut batch = LlamaBatch::new(total, 1);
            let mut rows = Vec::new();
            for &i in &multi {
                let tmp = self.ids.alloc()?;
                scratch_ids.push(tmp);
                self.ctx
                    .copy_kv_cache_seq(seq, tmp, None, None)
                    .map_err(|e| Error::Decode(e.to_string()))?;
                for (j, tok) in cands[i][..cands[i].len() - 1].iter().enumerate() {
                    rows.push((i, j + 1, batch.n_tokens()));
                    batch
                        .add(*tok, (len + j) as i32, &[tmp], true)
                        .map_err(|e| Error::Decode(e.to_string()))?;
                }
            }
            self.decode_side_batch(&mut batch, self.lora_of(seq))?;
            for (i, next, index) in rows {
                scores[i] += log_probs(self.ctx.get_logits_ith(index), &[cands[i][next].0])[0];
            }
            Ok(())
        })();
        for tmp in scratch_ids {
            let _ = self.ctx.clear_kv_cache_seq(Some(tmp as u32), None, None);
            self.ids.release(tmp);
        }
        result.map(|()| scores)
    }
}
