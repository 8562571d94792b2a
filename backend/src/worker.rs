//! The engine thread: owns the llama.cpp model and context and schedules every request.
//!
//! Each loop turn builds one `llama_batch` from all running requests: one token for every
//! sequence that is generating, then prompt chunks of sequences that are prefilling, up to
//! `n_batch` tokens. So P parallel generations cost one decode per token, not P.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::mpsc as tmpsc;

use crate::engine::{
    Command, Completion, EngineStats, GenEvent, Input, ModelInfo, PrefillStats, ReplyTx, SeqIds,
    StopReason,
};
use crate::gguf::GgufFile;
use crate::sampling::{log_probs, GenerateParams, TokenSampler};
use crate::text::{StopBuffer, StopCheck, Utf8Stream};
use crate::{EngineConfig, Error, Result};

/// llama.cpp's global state, initialised once per process with its logs sent to `tracing`.
pub(crate) fn llama_backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::ModelLoad {
            path: Default::default(),
            reason: format!("llama.cpp backend initialisation failed: {e}"),
        })
}

pub(crate) fn run(
    config: EngineConfig,
    gguf: GgufFile,
    ids: Arc<SeqIds>,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ModelInfo>>,
) {
    let loaded = (|| -> Result<(LlamaModel, Vec<LlamaLoraAdapter>)> {
        let backend = llama_backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(config.n_gpu_layers);
        let (model, said) = crate::llama_log::capture(|| {
            LlamaModel::load_from_file(backend, &config.model, &params)
        });
        let mut model = model.map_err(|e| Error::ModelLoad {
            path: config.model.clone(),
            reason: llama_reason(&e.to_string(), &said),
        })?;
        let adapters = config
            .lora_adapters
            .iter()
            .map(|p| {
                model.lora_adapter_init(p).map_err(|e| Error::Lora {
                    path: p.clone(),
                    reason: format!("llama.cpp rejected the adapter: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((model, adapters))
    })();
    let (model, adapters) = match loaded {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.n_ctx))
        .with_n_batch(config.n_batch)
        .with_n_ubatch(config.n_ubatch.min(config.n_batch))
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads_batch)
        .with_n_seq_max(config.max_sequences)
        .with_kv_unified(true)
        .with_type_k(config.kv_type.llama_type())
        .with_type_v(config.kv_type.llama_type())
        .with_flash_attention_policy(config.flash_attention.llama_policy());
    let ctx = match llama_backend().and_then(|b| {
        let (ctx, said) = crate::llama_log::capture(|| model.new_context(b, ctx_params));
        ctx.map_err(|e| Error::ModelLoad {
            path: config.model.clone(),
            reason: llama_reason(&format!("cannot create a context: {e}"), &said),
        })
    }) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let info = ModelInfo {
        path: config.model.clone(),
        architecture: gguf.architecture().unwrap_or_default().to_string(),
        name: gguf.get_str("general.name").map(str::to_string),
        n_params: model.n_params(),
        size_bytes: model.size(),
        n_ctx_train: model.n_ctx_train(),
        n_ctx: ctx.n_ctx(),
        n_vocab: model.n_vocab(),
        n_layer: model.n_layer(),
        n_embd: model.n_embd(),
        chat_template: gguf.chat_template().map(str::to_string),
        lora_adapters: config.lora_adapters.clone(),
    };
    tracing::info!(model = %config.model.display(), n_ctx = info.n_ctx, threads = config.threads, "engine ready");
    let n_ctx = info.n_ctx as usize;
    if ready.send(Ok(info)).is_err() {
        return;
    }
    let mut worker = Worker {
        model: &model,
        batch: LlamaBatch::new(config.n_batch as usize, 1),
        ctx,
        adapters,
        n_ctx,
        n_batch: config.n_batch as usize,
        ids,
        seqs: HashMap::new(),
        jobs: Vec::new(),
        stats: EngineStats::default(),
    };
    worker.serve(rx);
}

/// A llama-cpp-2 error with what llama.cpp logged about it.
fn llama_reason(error: &str, said: &[String]) -> String {
    match crate::llama_log::reason(said) {
        Some(why) => format!("{error} (llama.cpp: {why})"),
        None => error.to_string(),
    }
}

/// What the engine keeps per sequence.
#[derive(Default, Clone)]
struct SeqState {
    /// Every token of the sequence, including generated ones not decoded yet.
    tokens: Vec<LlamaToken>,
    /// How many of `tokens` are in the KV cache.
    n_decoded: usize,
    /// Next-token logits after all of `tokens`, when known.
    last_logits: Option<Vec<f32>>,
    busy: bool,
}

/// Where a generating job finds the logits for its next token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LogitsAt {
    Stored,
    Batch(i32),
}

struct GenJob {
    params: GenerateParams,
    sampler: TokenSampler,
    events: tmpsc::UnboundedSender<GenEvent>,
    utf8: Utf8Stream,
    stops: StopBuffer,
    text: String,
    tokens: Vec<i32>,
    logits_at: Option<LogitsAt>,
    first_token_at: Option<Instant>,
}

enum JobKind {
    Append(ReplyTx<PrefillStats>),
    Logits(ReplyTx<Vec<f32>>),
    Score(Vec<Vec<LlamaToken>>, ReplyTx<Vec<f32>>),
    Generate(Box<GenJob>),
    /// The job's answer has been sent.
    Finished,
}

struct Job {
    seq: i32,
    kind: JobKind,
    prefill: PrefillStats,
    started: Instant,
    done: bool,
}

/// Tokens one job put into the current batch.
struct BatchEntry {
    job: usize,
    n_decoded_before: usize,
    logits_index: Option<i32>,
    generated: bool,
}

struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    adapters: Vec<LlamaLoraAdapter>,
    n_ctx: usize,
    n_batch: usize,
    ids: Arc<SeqIds>,
    seqs: HashMap<i32, SeqState>,
    jobs: Vec<Job>,
    stats: EngineStats,
}

impl Worker<'_> {
    fn serve(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.jobs.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            if !self.jobs.is_empty() {
                self.step();
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Tokenize {
                text,
                add_special,
                reply,
            } => {
                let toks = self.tokenize(&text, add_special, true);
                let _ = reply.send(Ok(toks.iter().map(|t| t.0).collect()));
            }
            Command::Detokenize { tokens, reply } => {
                let _ = reply.send(self.detokenize(&tokens));
            }
            Command::ChatPrompt {
                messages,
                add_assistant,
                reply,
            } => {
                let _ = reply.send(self.chat_prompt(&messages, add_assistant));
            }
            Command::ChatParts {
                messages,
                add_assistant,
                reply,
            } => {
                let _ = reply.send(self.chat_parts(&messages, add_assistant));
            }
            Command::Append { seq, input, reply } => match self.start_append(seq, input) {
                Ok(Some(stats)) => {
                    let _ = reply.send(Ok(stats));
                }
                Ok(None) => self.push_job(seq, JobKind::Append(reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Generate {
                seq,
                params,
                events,
            } => {
                if let Err(e) = self.start_generate(seq, *params, events.clone()) {
                    let _ = events.send(GenEvent::Failed(e));
                }
            }
            Command::Score {
                seq,
                candidates,
                reply,
            } => {
                let prepared = self.prepare_score(seq, &candidates);
                match prepared {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(cands) if self.logits_ready(seq) => {
                        let _ = reply.send(self.score(seq, &cands));
                    }
                    Ok(cands) => self.push_job(seq, JobKind::Score(cands, reply)),
                }
            }
            Command::Logits { seq, reply } => match self.prepare_logits(seq) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(()) if self.logits_ready(seq) => {
                    let logits = self.seqs[&seq].last_logits.clone().unwrap_or_default();
                    let _ = reply.send(Ok(logits));
                }
                Ok(()) => self.push_job(seq, JobKind::Logits(reply)),
            },
            Command::TokenLogProbs {
                tokens,
                from,
                reply,
            } => {
                let _ = reply.send(self.token_log_probs(&tokens, from));
            }
            Command::Tokens { seq, reply } => {
                let toks = self
                    .seqs
                    .get(&seq)
                    .map(|s| s.tokens.iter().map(|t| t.0).collect())
                    .unwrap_or_default();
                let _ = reply.send(Ok(toks));
            }
            Command::Fork { src, dst, reply } => {
                let _ = reply.send(self.fork(src, dst));
            }
            Command::Truncate { seq, len, reply } => {
                let _ = reply.send(self.truncate(seq, len));
            }
            Command::Release { seq } => self.release(seq),
            Command::SetLora {
                index,
                scale,
                reply,
            } => {
                let _ = reply.send(self.set_lora(index, scale));
            }
            Command::Stats { reply } => {
                let mut stats = self.stats;
                stats.live_sequences = self.seqs.len();
                let _ = reply.send(Ok(stats));
            }
        }
    }

    // ----- requests -----------------------------------------------------------------------

    fn idle_seq(&mut self, seq: i32) -> Result<&mut SeqState> {
        let state = self.seqs.entry(seq).or_default();
        if state.busy {
            return Err(Error::SequenceBusy(seq));
        }
        Ok(state)
    }

    /// Tokens of `text`; `add_special` adds BOS where the model wants one, `parse_special`
    /// turns special-token markers into control tokens.
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<LlamaToken> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
    }

    fn detokenize(&self, tokens: &[i32]) -> Result<String> {
        let vocab = self.model.vocab();
        let n_vocab = self.model.n_vocab();
        let mut bytes = Vec::new();
        for &t in tokens {
            if t < 0 || t >= n_vocab {
                return Err(Error::InvalidParameter(format!(
                    "token id {t} is not in the vocabulary"
                )));
            }
            bytes.extend(vocab.token_to_piece(LlamaToken::new(t), true, None));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn chat_prompt(&self, messages: &[crate::ChatMessage], add_assistant: bool) -> Result<String> {
        let template = self
            .model
            .chat_template(None)
            .map_err(|e| Error::ChatTemplate(format!("the model has no chat template ({e})")))?;
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        self.model
            .apply_chat_template(&template, &chat, add_assistant)
            .map_err(|e| {
                Error::ChatTemplate(format!(
                    "llama.cpp cannot apply this model's template ({e})"
                ))
            })
    }

    /// The chat prompt split into template text and message contents: each content is
    /// rendered as a unique marker, found in the output and replaced by a content part.
    fn chat_parts(
        &self,
        messages: &[crate::ChatMessage],
        add_assistant: bool,
    ) -> Result<Vec<crate::PromptPart>> {
        let marker = |i: usize| format!("GEEKCONTENTMARKER{i}X");
        let marked: Vec<crate::ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| crate::ChatMessage::new(m.role.clone(), marker(i)))
            .collect();
        let mut rest = self.chat_prompt(&marked, add_assistant)?;
        let mut parts = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let Some(at) = rest.find(&marker(i)) else {
                // The template leaves this message out.
                continue;
            };
            if at > 0 {
                parts.push(crate::PromptPart::template(&rest[..at]));
            }
            parts.push(crate::PromptPart::content(m.content.clone()));
            rest = rest[at + marker(i).len()..].to_string();
        }
        if !rest.is_empty() {
            parts.push(crate::PromptPart::template(rest));
        }
        Ok(parts)
    }

    /// Adds the input to the sequence. `Some` when there is nothing to decode.
    fn start_append(&mut self, seq: i32, input: Input) -> Result<Option<PrefillStats>> {
        let n_vocab = self.model.n_vocab();
        let n_ctx = self.n_ctx;
        let is_empty = self.idle_seq(seq)?.tokens.is_empty();
        let new: Vec<LlamaToken> = match input {
            Input::Parts(parts) => parts
                .iter()
                .enumerate()
                .flat_map(|(i, p)| self.tokenize(&p.text, is_empty && i == 0, p.special))
                .collect(),
            Input::Tokens(toks) => {
                if let Some(bad) = toks.iter().find(|&&t| t < 0 || t >= n_vocab) {
                    return Err(Error::InvalidParameter(format!(
                        "token id {bad} is not in the vocabulary"
                    )));
                }
                toks.into_iter().map(LlamaToken::new).collect()
            }
        };
        let state = self.idle_seq(seq)?;
        let needed = state.tokens.len() + new.len();
        if needed > n_ctx {
            return Err(Error::ContextOverflow {
                needed,
                limit: n_ctx,
            });
        }
        if !new.is_empty() {
            state.last_logits = None;
        }
        state.tokens.extend(new);
        let (total, n_decoded) = (state.tokens.len(), state.n_decoded);
        self.stats.prompt_tokens_requested += total as u64;
        if n_decoded == total {
            return Ok(Some(PrefillStats {
                decoded: 0,
                reused: n_decoded,
                total,
            }));
        }
        Ok(None)
    }

    /// Makes sure the sequence's logits can be produced: the last token must be (re)decoded
    /// when they are not stored.
    fn prepare_logits(&mut self, seq: i32) -> Result<()> {
        let state = self.idle_seq(seq)?;
        if state.tokens.is_empty() {
            return Err(Error::InvalidParameter(
                "the sequence is empty: append a prompt first".into(),
            ));
        }
        if state.n_decoded == state.tokens.len() && state.last_logits.is_none() {
            state.n_decoded -= 1;
            let from = state.n_decoded as u32;
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(from), None);
        }
        Ok(())
    }

    fn logits_ready(&self, seq: i32) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.last_logits.is_some())
    }

    fn prepare_score(&mut self, seq: i32, candidates: &[String]) -> Result<Vec<Vec<LlamaToken>>> {
        if candidates.is_empty() {
            return Err(Error::InvalidParameter("no candidates to score".into()));
        }
        let cands: Vec<Vec<LlamaToken>> = candidates
            .iter()
            .map(|c| self.model.vocab().tokenize(c.as_bytes(), false, false))
            .collect();
        if let Some(i) = cands.iter().position(Vec::is_empty) {
            return Err(Error::InvalidParameter(format!(
                "candidate {:?} has no tokens",
                candidates[i]
            )));
        }
        self.prepare_logits(seq)?;
        let len = self.seqs[&seq].tokens.len();
        let longest = cands.iter().map(Vec::len).max().unwrap_or(0);
        if len + longest > self.n_ctx {
            return Err(Error::ContextOverflow {
                needed: len + longest,
                limit: self.n_ctx,
            });
        }
        let extra: usize = cands.iter().map(|c| c.len() - 1).sum();
        if extra > self.n_batch {
            return Err(Error::InvalidParameter(format!(
                "candidates hold {extra} tokens beyond their first; at most n_batch = {}",
                self.n_batch
            )));
        }
        self.stats.prompt_tokens_requested += len as u64;
        Ok(cands)
    }

    fn start_generate(
        &mut self,
        seq: i32,
        params: GenerateParams,
        events: tmpsc::UnboundedSender<GenEvent>,
    ) -> Result<()> {
        let sampler = TokenSampler::new(self.model, &params)?;
        self.prepare_logits(seq)?;
        let state = &self.seqs[&seq];
        self.stats.prompt_tokens_requested += state.tokens.len() as u64;
        let logits_at = state.last_logits.is_some().then_some(LogitsAt::Stored);
        let stops = StopBuffer::new(&params.stop);
        self.push_job(
            seq,
            JobKind::Generate(Box::new(GenJob {
                params,
                sampler,
                events,
                utf8: Utf8Stream::default(),
                stops,
                text: String::new(),
                tokens: Vec::new(),
                logits_at,
                first_token_at: None,
            })),
        );
        Ok(())
    }

    fn push_job(&mut self, seq: i32, kind: JobKind) {
        let state = self.seqs.entry(seq).or_default();
        state.busy = true;
        let prefill = PrefillStats {
            decoded: 0,
            reused: state.n_decoded,
            total: state.tokens.len(),
        };
        self.jobs.push(Job {
            seq,
            kind,
            prefill,
            started: Instant::now(),
            done: false,
        });
    }

    fn fork(&mut self, src: i32, dst: i32) -> Result<()> {
        let copy = self.idle_seq(src)?.clone();
        if copy.n_decoded > 0 {
            self.ctx
                .copy_kv_cache_seq(src, dst, None, None)
                .map_err(|e| Error::Decode(e.to_string()))?;
        }
        self.seqs.insert(dst, copy);
        Ok(())
    }

    fn truncate(&mut self, seq: i32, len: usize) -> Result<()> {
        let state = self.idle_seq(seq)?;
        if len >= state.tokens.len() {
            return Ok(());
        }
        state.tokens.truncate(len);
        // Keep the last kept token out of the cache so its logits are recomputed on next use.
        state.n_decoded = state.n_decoded.min(len.saturating_sub(1));
        state.last_logits = None;
        let from = state.n_decoded as u32;
        let _ = self
            .ctx
            .clear_kv_cache_seq(Some(seq as u32), Some(from), None);
        Ok(())
    }

    fn release(&mut self, seq: i32) {
        // A running request on a dropped sequence is abandoned: nobody can read its answer.
        self.jobs.retain(|j| j.seq != seq);
        if self.seqs.remove(&seq).is_some() {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        }
    }

    fn set_lora(&mut self, index: Option<usize>, scale: f32) -> Result<()> {
        if !self.jobs.is_empty() {
            return Err(Error::InvalidParameter(
                "cannot switch LoRA adapters while requests are running".into(),
            ));
        }
        let lora_err = |reason: String| Error::Lora {
            path: Default::default(),
            reason,
        };
        match index {
            Some(i) => {
                let n = self.adapters.len();
                let adapter = self.adapters.get_mut(i).ok_or_else(|| {
                    lora_err(format!("no adapter {i}: {n} were loaded with the model"))
                })?;
                self.ctx
                    .lora_adapter_set(adapter, scale)
                    .map_err(|e| lora_err(e.to_string()))?;
            }
            None => {
                if let Some(adapter) = self.adapters.first_mut() {
                    self.ctx
                        .lora_adapter_remove(adapter)
                        .map_err(|e| lora_err(e.to_string()))?;
                }
            }
        }
        // Cached keys and values were computed with the old weights.
        self.ctx.clear_kv_cache();
        for state in self.seqs.values_mut() {
            state.n_decoded = 0;
            state.last_logits = None;
        }
        Ok(())
    }

    // ----- scheduling ---------------------------------------------------------------------

    /// One decode over every running job.
    fn step(&mut self) {
        self.batch.clear();
        let mut entries: Vec<BatchEntry> = Vec::new();
        self.sample_generating(&mut entries);
        self.add_prefill(&mut entries);
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
    /// the batch.
    fn sample_generating(&mut self, entries: &mut Vec<BatchEntry>) {
        let model = self.model;
        let vocab = model.vocab();
        for (ji, job) in self.jobs.iter_mut().enumerate() {
            let JobKind::Generate(gen) = &mut job.kind else {
                continue;
            };
            let Some(at) = gen.logits_at.take() else {
                continue;
            };
            let state = self.seqs.get_mut(&job.seq).expect("job on a live sequence");
            if gen.first_token_at.is_none() {
                gen.first_token_at = Some(Instant::now());
            }
            if state.tokens.len() >= self.n_ctx {
                finish_generation(job, StopReason::ContextFull, state);
                continue;
            }
            let token = match at {
                LogitsAt::Stored => {
                    let logits = state.last_logits.take().unwrap_or_default();
                    gen.sampler.sample(&logits)
                }
                LogitsAt::Batch(i) => gen.sampler.sample(self.ctx.get_logits_ith(i)),
            };
            state.tokens.push(token);
            gen.tokens.push(token.0);
            self.stats.generated_tokens += 1;

            let mut stop = None;
            if vocab.is_eog(token) && !gen.params.ignore_eos {
                stop = Some(StopReason::Eos);
            } else {
                let piece = gen.utf8.push(&vocab.token_to_piece(token, false, None));
                let (emit, matched) = match gen.stops.push(&piece) {
                    StopCheck::Emit(s) => (s, None),
                    StopCheck::Stopped { emit, stop } => (emit, Some(stop)),
                };
                if !emit.is_empty() {
                    gen.text.push_str(&emit);
                    if gen.events.send(GenEvent::Piece(emit)).is_err() {
                        stop = Some(StopReason::Cancelled);
                    }
                }
                if let Some(s) = matched {
                    stop = Some(StopReason::Stop(s));
                } else if gen.tokens.len() >= gen.params.max_tokens {
                    stop = Some(StopReason::MaxTokens);
                }
            }
            if let Some(reason) = stop {
                finish_generation(job, reason, state);
                continue;
            }
            let pos = state.n_decoded;
            let logits_index = self.batch.n_tokens();
            if self.batch.add(token, pos as i32, &[job.seq], true).is_err() {
                // Unreachable: one token per job and n_seq_max <= n_batch is checked at load.
                finish_generation(job, StopReason::ContextFull, state);
                continue;
            }
            state.n_decoded += 1;
            entries.push(BatchEntry {
                job: ji,
                n_decoded_before: pos,
                logits_index: Some(logits_index),
                generated: true,
            });
        }
    }

    /// Fills the rest of the batch with prompt tokens of jobs that are not decoded up to date.
    fn add_prefill(&mut self, entries: &mut Vec<BatchEntry>) {
        for (ji, job) in self.jobs.iter_mut().enumerate() {
            if job.done {
                continue;
            }
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

    fn after_decode(&mut self, entries: &[BatchEntry]) {
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
    fn complete(&mut self, ji: usize) {
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

    fn fail_batch(&mut self, entries: &[BatchEntry], err: DecodeError) {
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
            let kind = std::mem::replace(&mut job.kind, JobKind::Finished);
            match kind {
                JobKind::Append(r) => drop(r.send(Err(e))),
                JobKind::Logits(r) => drop(r.send(Err(e))),
                JobKind::Score(_, r) => drop(r.send(Err(e))),
                JobKind::Generate(g) => drop(g.events.send(GenEvent::Failed(e))),
                JobKind::Finished => {}
            }
        }
    }

    /// Decodes a batch built outside the main loop (scoring, token log-probs), counting it.
    fn decode_side_batch(&mut self, batch: &mut LlamaBatch) -> Result<()> {
        self.ctx.decode(batch).map_err(|e| match e {
            DecodeError::NoKvCacheSlot => Error::KvCacheFull { n_ctx: self.n_ctx },
            other => Error::Decode(other.to_string()),
        })?;
        self.stats.decode_calls += 1;
        self.stats.batch_tokens += batch.n_tokens() as u64;
        Ok(())
    }

    /// See [`crate::Engine::token_log_probs`].
    fn token_log_probs(&mut self, tokens: &[i32], from: usize) -> Result<Vec<f32>> {
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
                self.decode_side_batch(&mut batch)?;
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
    fn score(&mut self, seq: i32, cands: &[Vec<LlamaToken>]) -> Result<Vec<f32>> {
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
            self.decode_side_batch(&mut batch)?;
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
    };
    let _ = gen.events.send(GenEvent::Done(completion));
}
