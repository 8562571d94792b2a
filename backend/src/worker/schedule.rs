//! The scheduler: each turn builds one `llama_batch` from every running job on one adapter's
//! weights (one token per generating sequence, then prompt chunks of prefilling ones) and
//! hands out the results.

use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

use super::adapters::Lora;
use super::{lookup, BatchEntry, GenJob, Job, JobKind, LogitsAt, SeqState, Worker};
use crate::sampling::{log_probs, top_log_probs};
use crate::text::StopCheck;
use crate::types::{Completion, EngineStats, GenEvent, PrefillStats, StopReason};
use crate::Error;

impl Worker<'_> {
    /// One decode over every running job on the weights whose turn it is.
    pub(super) fn step(&mut self) {
        let turn = self.next_lora_turn();
        if self.last_turn != Some(turn) {
            self.save_batch_logits();
            self.last_turn = Some(turn);
        }
        if let Err(e) = self.apply_lora(turn) {
            self.fail_turn(turn, &e);
            return;
        }
        self.batch.clear();
        let mut entries: Vec<BatchEntry> = Vec::new();
        self.sample_generating(&mut entries, turn);
        self.add_prefill(&mut entries, turn);
        if self.batch.n_tokens() > 0 {
            let n_tokens = self.batch.n_tokens() as u64;
            match self.ctx.decode(&mut self.batch) {
                Ok(()) => {
                    self.stats.decode_calls += 1;
                    self.stats.batch_tokens += n_tokens;
                    self.after_decode(&entries);
                }
                Err(e) => self.fail_batch(&entries, e),
            }
        }
        self.jobs.retain(|j| !j.done);
    }

    /// Samples the next token of every generating job whose logits are known and puts it into
    /// the batch. Tokens drafted at the last step are checked first: each one greedy decoding
    /// agrees with is kept (it is decoded already), the first it disagrees with ends the draft.
    // Longer than 80 lines: one pass over the generating jobs that verifies drafted tokens, samples, streams and checks stops on the same borrowed job state.
    pub(super) fn sample_generating(&mut self, entries: &mut Vec<BatchEntry>, turn: Lora) {
        for ji in 0..self.jobs.len() {
            if self.lora_of(self.jobs[ji].seq) != turn {
                continue;
            }
            let later = self.jobs_left_to_sample(ji, turn);
            let job = &mut self.jobs[ji];
            let JobKind::Generate(gen) = &mut job.kind else {
                continue;
            };
            let Some(at) = gen.logits_at.take() else {
                continue;
            };
            if gen.first_token_at.is_none() {
                gen.first_token_at = Some(Instant::now());
            }
            let state = self.seqs.get_mut(&job.seq).expect("job on a live sequence");
            let draft = std::mem::take(&mut gen.draft);
            let saved = std::mem::take(&mut gen.saved_logits);
            let sampling_started = Instant::now();
            let model = self.model;
            let mut token = match at {
                LogitsAt::Stored => {
                    let logits = state.last_logits.take().unwrap_or_default();
                    choose(gen, &logits, model)
                }
                LogitsAt::Batch(i) => choose(gen, self.ctx.get_logits_ith(i), model),
                LogitsAt::Saved => choose(gen, &saved[0], model),
            };
            let mut stop = None;
            let mut kept = 0;
            for (j, &drafted) in draft.iter().enumerate() {
                if token != drafted {
                    break;
                }
                // Kept: it is in the cache at the next position already.
                kept += 1;
                gen.accepted += 1;
                self.stats.accepted_draft_tokens += 1;
                stop = accept(gen, state, token, self.model, &mut self.stats);
                state.n_decoded += 1;
                if stop.is_some() {
                    break;
                }
                token = match at {
                    LogitsAt::Batch(i) => {
                        choose(gen, self.ctx.get_logits_ith(i + 1 + j as i32), model)
                    }
                    LogitsAt::Saved => choose(gen, &saved[1 + j], model),
                    LogitsAt::Stored => unreachable!("drafts are decoded in a batch"),
                };
            }
            if !draft.is_empty() {
                gen.draft_len = if kept == draft.len() {
                    (gen.draft_len + 1).min(self.lookup_draft)
                } else {
                    kept.max(1)
                };
            }
            // Drop the rejected drafts from the cache.
            if kept < draft.len() {
                let _ = self.ctx.clear_kv_cache_seq(
                    Some(job.seq as u32),
                    Some(state.n_decoded as u32),
                    None,
                );
            }
            gen.sampling_seconds += sampling_started.elapsed().as_secs_f64();
            if let Some(reason) = stop {
                finish_generation(job, reason, state);
                continue;
            }
            if state.tokens.len() >= self.n_ctx {
                finish_generation(job, StopReason::ContextFull, state);
                continue;
            }
            if let Some(reason) = accept(gen, state, token, self.model, &mut self.stats) {
                finish_generation(job, reason, state);
                continue;
            }
            // Decode the token, with a draft of what follows when greedy decoding allows one.
            let room = (self.n_batch - self.batch.n_tokens() as usize)
                .saturating_sub(later)
                .min(self.n_ctx.saturating_sub(state.tokens.len()));
            let max_draft = if gen.params.sampling.is_plain_greedy() {
                gen.draft_len.min(room.saturating_sub(1))
            } else {
                0
            };
            let next_draft = lookup::draft(&state.tokens, max_draft);
            let pos = state.n_decoded;
            let logits_index = self.batch.n_tokens();
            let added = std::iter::once(token)
                .chain(next_draft.iter().copied())
                .enumerate()
                .all(|(k, t)| {
                    self.batch
                        .add(t, (pos + k) as i32, &[job.seq], true)
                        .is_ok()
                });
            if !added {
                // Unreachable: the room was checked above.
                finish_generation(job, StopReason::ContextFull, state);
                continue;
            }
            gen.drafted += next_draft.len();
            self.stats.drafted_tokens += next_draft.len() as u64;
            gen.draft = next_draft;
            state.n_decoded += 1;
            entries.push(BatchEntry {
                job: ji,
                n_decoded_before: pos,
                logits_index: Some(logits_index),
                generated: true,
            });
        }
    }

    /// Generating jobs after `ji` that will add a token to this batch (room is kept for them).
    fn jobs_left_to_sample(&self, ji: usize, turn: Lora) -> usize {
        self.jobs[ji + 1..]
            .iter()
            .filter(|j| matches!(&j.kind, JobKind::Generate(g) if g.logits_at.is_some()))
            .filter(|j| self.lora_of(j.seq) == turn)
            .count()
    }

    /// Fills the rest of the batch with prompt tokens of jobs that are not decoded up to date.
    pub(super) fn add_prefill(&mut self, entries: &mut Vec<BatchEntry>, turn: Lora) {
        for ji in 0..self.jobs.len() {
            if self.jobs[ji].done || self.lora_of(self.jobs[ji].seq) != turn {
                continue;
            }
            let job = &mut self.jobs[ji];
            let room = self.n_batch - self.batch.n_tokens() as usize;
            if room == 0 {
                break;
            }
            let state = self.seqs.get_mut(&job.seq).expect("job on a live sequence");
            if state.n_decoded >= state.tokens.len() || entries.iter().any(|e| e.job == ji) {
                continue;
            }
            let start = state.n_decoded;
            let end = state.tokens.len().min(start + room);
            let mut logits_index = None;
            for pos in start..end {
                let last = pos + 1 == state.tokens.len();
                if last {
                    logits_index = Some(self.batch.n_tokens());
                }
                // Cannot fail: `room` was computed from the batch's free space.
                let _ = self
                    .batch
                    .add(state.tokens[pos], pos as i32, &[job.seq], last);
            }
            state.n_decoded = end;
            state.last_logits = None;
            job.prefill.decoded += end - start;
            self.stats.prompt_tokens_decoded += (end - start) as u64;
            entries.push(BatchEntry {
                job: ji,
                n_decoded_before: start,
                logits_index,
                generated: false,
            });
        }
    }

    pub(super) fn after_decode(&mut self, entries: &[BatchEntry]) {
        for entry in entries {
            let Some(index) = entry.logits_index else {
                continue;
            };
            let seq = self.jobs[entry.job].seq;
            if let JobKind::Generate(gen) = &mut self.jobs[entry.job].kind {
                gen.logits_at = Some(LogitsAt::Batch(index));
                continue;
            }
            let logits = self.ctx.get_logits_ith(index).to_vec();
            if let Some(state) = self.seqs.get_mut(&seq) {
                state.last_logits = Some(logits);
            }
            self.complete(entry.job);
        }
    }

    /// Finishes a non-generating job whose sequence is now decoded with logits.
    pub(super) fn complete(&mut self, ji: usize) {
        let seq = self.jobs[ji].seq;
        let job = &mut self.jobs[ji];
        job.done = true;
        let prefill = job.prefill;
        let kind = std::mem::replace(&mut job.kind, JobKind::Finished);
        if let Some(state) = self.seqs.get_mut(&seq) {
            state.busy = false;
        }
        match kind {
            JobKind::Append(reply) => {
                let total = self.seqs.get(&seq).map_or(0, |s| s.tokens.len());
                let _ = reply.send(Ok(PrefillStats { total, ..prefill }));
            }
            JobKind::Logits(reply) => {
                let logits = self.seqs.get(&seq).and_then(|s| s.last_logits.clone());
                let _ = reply.send(logits.ok_or(Error::EngineStopped));
            }
            JobKind::Score(cands, reply) => {
                let _ = reply.send(self.score(seq, &cands));
            }
            JobKind::Generate(_) | JobKind::Finished => {}
        }
    }

    pub(super) fn fail_batch(&mut self, entries: &[BatchEntry], err: DecodeError) {
        tracing::warn!(%err, "llama_decode failed");
        for entry in entries {
            let job = &mut self.jobs[entry.job];
            let e = match err {
                DecodeError::NoKvCacheSlot => Error::KvCacheFull { n_ctx: self.n_ctx },
                ref other => Error::Decode(other.to_string()),
            };
            if let Some(state) = self.seqs.get_mut(&job.seq) {
                state.n_decoded = entry.n_decoded_before;
                if entry.generated {
                    // The sampled token was never decoded; keep the sequence as it was.
                    state.tokens.truncate(entry.n_decoded_before);
                }
                state.busy = false;
                let _ = self.ctx.clear_kv_cache_seq(
                    Some(job.seq as u32),
                    Some(entry.n_decoded_before as u32),
                    None,
                );
            }
            job.done = true;
            send_failure(std::mem::replace(&mut job.kind, JobKind::Finished), e);
        }
    }

    /// Fails every job on weights that cannot be put on the context (`reason`).
    fn fail_turn(&mut self, turn: Lora, reason: &Error) {
        tracing::warn!(%reason, "cannot apply a LoRA adapter");
        for ji in 0..self.jobs.len() {
            let seq = self.jobs[ji].seq;
            if self.jobs[ji].done || self.lora_of(seq) != turn {
                continue;
            }
            if let Some(state) = self.seqs.get_mut(&seq) {
                state.busy = false;
            }
            let job = &mut self.jobs[ji];
            job.done = true;
            let e = Error::Lora {
                path: Default::default(),
                reason: reason.to_string(),
            };
            send_failure(std::mem::replace(&mut job.kind, JobKind::Finished), e);
        }
        self.jobs.retain(|j| !j.done);
    }
}

/// Answers a job that failed with `e`.
fn send_failure(kind: JobKind, e: Error) {
    match kind {
        JobKind::Append(r) => drop(r.send(Err(e))),
        JobKind::Logits(r) => drop(r.send(Err(e))),
        JobKind::Score(_, r) => drop(r.send(Err(e))),
        JobKind::Generate(g) => drop(g.events.send(GenEvent::Failed(e))),
        JobKind::Finished => {}
    }
}

/// Samples the next token from `logits`, recording log-probabilities when they were asked for.
fn choose(gen: &mut GenJob, logits: &[f32], model: &LlamaModel) -> LlamaToken {
    let token = gen.sampler.sample(logits);
    if gen.params.logprobs > 0 {
        let piece = |t: i32| {
            String::from_utf8_lossy(
                &model
                    .vocab()
                    .token_to_piece(LlamaToken::new(t), false, None),
            )
            .into_owned()
        };
        let top = top_log_probs(logits, gen.params.logprobs);
        gen.logprobs.push(crate::types::TokenLogprob {
            token: piece(token.0),
            logprob: log_probs(logits, &[token.0])[0],
            top: top.into_iter().map(|(t, lp)| (piece(t), lp)).collect(),
        });
    }
    token
}

/// Records a sampled token in the generation and its sequence; `Some` when it ends the
/// generation (end of generation, a stop string, the token budget, a dropped receiver).
fn accept(
    gen: &mut GenJob,
    state: &mut SeqState,
    token: LlamaToken,
    model: &LlamaModel,
    stats: &mut EngineStats,
) -> Option<StopReason> {
    let vocab = model.vocab();
    state.tokens.push(token);
    gen.tokens.push(token.0);
    stats.generated_tokens += 1;
    if vocab.is_eog(token) && !gen.params.ignore_eos {
        return Some(StopReason::Eos);
    }
    let piece = gen.utf8.push(&vocab.token_to_piece(token, false, None));
    let (emit, matched) = match gen.stops.push(&piece) {
        StopCheck::Emit(s) => (s, None),
        StopCheck::Stopped { emit, stop } => (emit, Some(stop)),
    };
    let mut stop = None;
    if !emit.is_empty() {
        gen.text.push_str(&emit);
        if gen.events.send(GenEvent::Piece(emit)).is_err() {
            stop = Some(StopReason::Cancelled);
        }
    }
    if let Some(s) = matched {
        stop = Some(StopReason::Stop(s));
    } else if stop.is_none() && gen.tokens.len() >= gen.params.max_tokens {
        stop = Some(StopReason::MaxTokens);
    }
    stop
}

/// Sends the final event of a generation and frees its sequence.
fn finish_generation(job: &mut Job, stop: StopReason, state: &mut SeqState) {
    job.done = true;
    state.busy = false;
    let JobKind::Generate(gen) = &mut job.kind else {
        return;
    };
    if !matches!(stop, StopReason::Stop(_) | StopReason::Cancelled) {
        let rest = gen.utf8.finish() + &gen.stops.finish();
        if !rest.is_empty() {
            gen.text.push_str(&rest);
            let _ = gen.events.send(GenEvent::Piece(rest));
        }
    }
    let first = gen.first_token_at.unwrap_or(job.started);
    let completion = Completion {
        text: std::mem::take(&mut gen.text),
        tokens: std::mem::take(&mut gen.tokens),
        stop,
        prefill: job.prefill,
        prefill_seconds: (first - job.started).as_secs_f64(),
        generation_seconds: first.elapsed().as_secs_f64(),
        sampling_seconds: gen.sampling_seconds,
        drafted: gen.drafted,
        accepted: gen.accepted,
        logprobs: std::mem::take(&mut gen.logprobs),
    };
    let _ = gen.events.send(GenEvent::Done(completion));
}
