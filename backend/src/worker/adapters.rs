//! LoRA adapters per sequence: the engine's default adapter, sequences pinned to their own,
//! and the turns the scheduler gives each adapter's sequences.
//!
//! llama.cpp applies one set of adapters to a whole `llama_decode`, so a batch holds sequences
//! of one adapter only. When sequences on several adapters have work, successive batches
//! alternate between them; before a batch on other weights (or a decode outside the loop)
//! overwrites the context's logits, the logits generating jobs still have to read are copied
//! out ([`Worker::save_batch_logits`]).

use super::{JobKind, LogitsAt, Worker};
use crate::{Error, Result};

/// An adapter and its scale; `None` is the base model.
pub(crate) type Lora = Option<(usize, f32)>;

/// Which weights a sequence decodes with.
#[derive(Default, Clone, Copy, PartialEq, Debug)]
pub(crate) enum SeqLora {
    /// The engine's adapter, switched by [`crate::Engine::set_lora`].
    #[default]
    Engine,
    /// Its own, set by [`crate::Sequence::set_lora`].
    Pinned(Lora),
}

fn lora_error(reason: String) -> Error {
    Error::Lora {
        path: Default::default(),
        reason,
    }
}

impl Worker<'_> {
    /// The weights sequence `seq` decodes with.
    pub(super) fn lora_of(&self, seq: i32) -> Lora {
        match self.seqs.get(&seq).map(|s| s.lora) {
            Some(SeqLora::Pinned(lora)) => lora,
            _ => self.engine_lora,
        }
    }

    fn check_adapter(&self, lora: Lora) -> Result<()> {
        match lora {
            Some((i, _)) if i >= self.adapters.len() => Err(lora_error(format!(
                "no adapter {i}: {} were loaded with the model",
                self.adapters.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Puts `lora` on the context for the next decode (nothing to do when it is on already).
    pub(super) fn apply_lora(&mut self, lora: Lora) -> Result<()> {
        if self.applied_lora == lora {
            return Ok(());
        }
        self.check_adapter(lora)?;
        match lora {
            Some((i, scale)) => self
                .ctx
                .lora_adapter_set(&mut self.adapters[i], scale)
                .map_err(|e| lora_error(e.to_string()))?,
            None => {
                if let Some(adapter) = self.adapters.first_mut() {
                    self.ctx
                        .lora_adapter_remove(adapter)
                        .map_err(|e| lora_error(e.to_string()))?;
                }
            }
        }
        self.applied_lora = lora;
        Ok(())
    }

    /// Switches the engine's adapter; the caches of the sequences that follow it are cleared.
    pub(super) fn set_lora(&mut self, index: Option<usize>, scale: f32) -> Result<()> {
        if !self.jobs.is_empty() {
            return Err(Error::InvalidParameter(
                "cannot switch LoRA adapters while requests are running".into(),
            ));
        }
        let lora = index.map(|i| (i, scale));
        self.check_adapter(lora)?;
        self.engine_lora = lora;
        *self.active_lora.lock().unwrap_or_else(|p| p.into_inner()) = lora;
        let followers: Vec<i32> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.lora == SeqLora::Engine)
            .map(|(&id, _)| id)
            .collect();
        for seq in followers {
            self.forget_cache(seq);
        }
        Ok(())
    }

    /// Pins sequence `seq` to `lora`; its cache is cleared when its weights change.
    pub(super) fn pin_lora(&mut self, seq: i32, lora: Lora) -> Result<()> {
        self.check_adapter(lora)?;
        let before = self.lora_of(seq);
        self.idle_seq(seq)?.lora = SeqLora::Pinned(lora);
        if before != lora {
            self.forget_cache(seq);
        }
        Ok(())
    }

    /// Drops the sequence's cached keys and values: it is decoded again on next use.
    fn forget_cache(&mut self, seq: i32) {
        if let Some(state) = self.seqs.get_mut(&seq) {
            state.n_decoded = 0;
            state.last_logits = None;
        }
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
    }

    /// The adapter whose sequences make the next batch: another one than the last batch's
    /// when some job waits on other weights, so turns alternate.
    pub(super) fn next_lora_turn(&self) -> Lora {
        let mut first = None;
        for job in self.jobs.iter().filter(|j| !j.done) {
            let lora = self.lora_of(job.seq);
            if self.last_turn != Some(lora) {
                return lora;
            }
            first.get_or_insert(lora);
        }
        first.unwrap_or(self.engine_lora)
    }

    /// Copies out the context's logits that generating jobs have yet to sample from (the next
    /// token and any drafted ones), before a decode overwrites them.
    pub(super) fn save_batch_logits(&mut self) {
        for job in &mut self.jobs {
            let JobKind::Generate(gen) = &mut job.kind else {
                continue;
            };
            let Some(LogitsAt::Batch(i)) = gen.logits_at else {
                continue;
            };
            gen.saved_logits = (0..=gen.draft.len() as i32)
                .map(|k| self.ctx.get_logits_ith(i + k).to_vec())
                .collect();
            gen.logits_at = Some(LogitsAt::Saved);
        }
    }
}
