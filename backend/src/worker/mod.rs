//! The engine thread: owns the llama.cpp model and context and answers every request.
//!
//! [`requests`] starts what each command asks, [`schedule`] batches the running jobs into
//! `llama_decode` calls, [`scoring`] evaluates candidates and token log-probabilities,
//! [`adapters`] keeps each sequence's LoRA adapter and gives each adapter its turns.
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
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc as tmpsc;

use crate::gguf::GgufFile;
use crate::protocol::{Command, ReplyTx, SeqIds};
use crate::sampling::{GenerateParams, TokenSampler};
use crate::text::{StopBuffer, Utf8Stream};
use crate::types::{EngineStats, GenEvent, ModelInfo, PrefillStats};
use crate::{EngineConfig, Error, Result};

mod adapters;
mod lookup;
mod requests;
mod schedule;
mod scoring;

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
    active_lora: ActiveLora,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<ModelInfo>>,
) {
    let (model, adapters) = match load_model(&config) {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let ctx = match new_context(&model, &config) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let info = model_info(&config, &gguf, &model, ctx.n_ctx());
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
        lookup_draft: config.lookup_draft,
        ids,
        active_lora,
        engine_lora: None,
        applied_lora: None,
        last_turn: None,
        seqs: HashMap::new(),
        jobs: Vec::new(),
        stats: EngineStats::default(),
    };
    worker.serve(rx);
}

/// A llama-cpp-2 error with what llama.cpp logged about it.
/// The model and its LoRA adapters, with llama.cpp's own reason when it refuses one.
fn load_model(config: &EngineConfig) -> Result<(LlamaModel, Vec<LlamaLoraAdapter>)> {
    let backend = llama_backend()?;
    let params = LlamaModelParams::default().with_n_gpu_layers(config.n_gpu_layers);
    let (model, said) =
        crate::llama_log::capture(|| LlamaModel::load_from_file(backend, &config.model, &params));
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
}

/// The llama.cpp context of the engine: one unified KV cache shared by all sequences.
fn new_context<'m>(model: &'m LlamaModel, config: &EngineConfig) -> Result<LlamaContext<'m>> {
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
    let backend = llama_backend()?;
    let (ctx, said) = crate::llama_log::capture(|| model.new_context(backend, ctx_params));
    ctx.map_err(|e| Error::ModelLoad {
        path: config.model.clone(),
        reason: llama_reason(&format!("cannot create a context: {e}"), &said),
    })
}

fn model_info(config: &EngineConfig, gguf: &GgufFile, model: &LlamaModel, n_ctx: u32) -> ModelInfo {
    ModelInfo {
        path: config.model.clone(),
        architecture: gguf.architecture().unwrap_or_default().to_string(),
        name: gguf.get_str("general.name").map(str::to_string),
        n_params: model.n_params(),
        size_bytes: model.size(),
        n_ctx_train: model.n_ctx_train(),
        n_ctx,
        n_vocab: model.n_vocab(),
        n_layer: model.n_layer(),
        n_embd: model.n_embd(),
        chat_template: gguf.chat_template().map(str::to_string),
        kv_type: config.kv_type,
        lora_adapters: config.lora_adapters.clone(),
    }
}

fn llama_reason(error: &str, said: &[String]) -> String {
    match crate::llama_log::reason(said) {
        Some(why) => format!("{error} (llama.cpp: {why})"),
        None => error.to_string(),
    }
}

/// What the engine keeps per sequence.
#[derive(Default, Clone)]
pub(super) struct SeqState {
    /// Every token of the sequence, including generated ones not decoded yet.
    pub(super) tokens: Vec<LlamaToken>,
    /// How many of `tokens` are in the KV cache.
    pub(super) n_decoded: usize,
    /// Next-token logits after all of `tokens`, when known.
    pub(super) last_logits: Option<Vec<f32>>,
    pub(super) busy: bool,
    /// The weights it decodes with.
    pub(super) lora: adapters::SeqLora,
}

/// Where a generating job finds the logits for its next token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum LogitsAt {
    /// The sequence's `last_logits`.
    Stored,
    /// Row `i` of the last batch (and the rows after it, for drafted tokens).
    Batch(i32),
    /// The job's `saved_logits`: the batch rows, copied before another decode.
    Saved,
}

pub(super) struct GenJob {
    pub(super) params: GenerateParams,
    pub(super) sampler: TokenSampler,
    pub(super) events: tmpsc::UnboundedSender<GenEvent>,
    utf8: Utf8Stream,
    pub(super) stops: StopBuffer,
    pub(super) text: String,
    pub(super) tokens: Vec<i32>,
    pub(super) logits_at: Option<LogitsAt>,
    pub(super) first_token_at: Option<Instant>,
    /// Drafted tokens decoded after the last sampled one, waiting to be checked.
    draft: Vec<LlamaToken>,
    /// The logits of the next token and of each drafted one, when [`LogitsAt::Saved`].
    saved_logits: Vec<Vec<f32>>,
    /// How many tokens the next draft may have: grows while drafts are kept whole, shrinks
    /// to what was kept when one is cut (a rejected token costs a decode slot).
    draft_len: usize,
    /// Seconds spent in the sampler.
    sampling_seconds: f64,
    /// Log-probabilities of the generated tokens, when asked for.
    logprobs: Vec<crate::types::TokenLogprob>,
    /// Tokens drafted, and accepted, over the generation.
    drafted: usize,
    accepted: usize,
}

pub(super) enum JobKind {
    Append(ReplyTx<PrefillStats>),
    Logits(ReplyTx<Vec<f32>>),
    Score(Vec<Vec<LlamaToken>>, ReplyTx<Vec<f32>>),
    Generate(Box<GenJob>),
    /// The job's answer has been sent.
    Finished,
}

pub(super) struct Job {
    pub(super) seq: i32,
    pub(super) kind: JobKind,
    pub(super) prefill: PrefillStats,
    pub(super) started: Instant,
    pub(super) done: bool,
}

/// Tokens one job put into the current batch.
/// The LoRA adapter switched on (its index and scale), shared with the [`crate::Engine`].
pub(crate) type ActiveLora = Arc<std::sync::Mutex<Option<(usize, f32)>>>;

pub(super) struct BatchEntry {
    pub(super) job: usize,
    pub(super) n_decoded_before: usize,
    pub(super) logits_index: Option<i32>,
    pub(super) generated: bool,
}

pub(super) struct Worker<'m> {
    pub(super) model: &'m LlamaModel,
    pub(super) ctx: LlamaContext<'m>,
    pub(super) batch: LlamaBatch<'static>,
    pub(super) adapters: Vec<LlamaLoraAdapter>,
    pub(super) n_ctx: usize,
    pub(super) n_batch: usize,
    /// Most tokens drafted per step by prompt lookup (0: off).
    lookup_draft: usize,
    pub(super) ids: Arc<SeqIds>,
    /// The adapter switched on and its scale, as the engine reports it.
    pub(super) active_lora: ActiveLora,
    /// The engine's adapter (what `active_lora` reports), for sequences not pinned to one.
    pub(super) engine_lora: adapters::Lora,
    /// The adapter on the llama.cpp context now.
    pub(super) applied_lora: adapters::Lora,
    /// The adapter of the last batch's sequences.
    pub(super) last_turn: Option<adapters::Lora>,
    pub(super) seqs: HashMap<i32, SeqState>,
    pub(super) jobs: Vec<Job>,
    pub(super) stats: EngineStats,
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

    // Longer than 80 lines: one arm per `Command`, each a few lines: a dispatch table.
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Tokenize {
                text,
                add_special,
                parse_special,
                reply,
            } => {
                let toks = self.tokenize(&text, add_special, parse_special);
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
            Command::SaveState { seq, path, reply } => {
                let _ = reply.send(self.save_state(seq, &path));
            }
            Command::LoadState { seq, path, reply } => {
                let _ = reply.send(self.load_state(seq, &path));
            }
            Command::SetLora {
                index,
                scale,
                reply,
            } => {
                let _ = reply.send(self.set_lora(index, scale));
            }
            Command::PinLora { seq, lora, reply } => {
                let _ = reply.send(self.pin_lora(seq, lora));
            }
            Command::Stats { reply } => {
                let mut stats = self.stats;
                stats.live_sequences = self.seqs.len();
                let _ = reply.send(Ok(stats));
            }
        }
    }
}
