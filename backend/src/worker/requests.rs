//! The requests the engine thread answers: tokenizing, chat templates, appends, forks,
//! truncation, and the setup of jobs the scheduler runs.

use std::time::Instant;

use llama_cpp_2::model::LlamaChatMessage;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc as tmpsc;

use super::{GenJob, Job, JobKind, LogitsAt, SeqState, Worker};
use crate::protocol::Input;
use crate::sampling::{GenerateParams, TokenSampler};
use crate::text::{StopBuffer, Utf8Stream};
use crate::types::{GenEvent, PrefillStats};
use crate::{Error, Result};

impl Worker<'_> {
    pub(super) fn idle_seq(&mut self, seq: i32) -> Result<&mut SeqState> {
        let state = self.seqs.entry(seq).or_default();
        if state.busy {
            return Err(Error::SequenceBusy(seq));
        }
        Ok(state)
    }

    /// Tokens of `text`; `add_special` adds BOS where the model wants one, `parse_special`
    /// turns special-token markers into control tokens.
    pub(super) fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Vec<LlamaToken> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
    }

    pub(super) fn detokenize(&self, tokens: &[i32]) -> Result<String> {
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

    pub(super) fn chat_prompt(
        &self,
        messages: &[crate::ChatMessage],
        add_assistant: bool,
    ) -> Result<String> {
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
    pub(super) fn chat_parts(
        &self,
        messages: &[crate::ChatMessage],
        add_assistant: bool,
    ) -> Result<Vec<crate::PromptPart>> {
        let rendered = self.chat_prompt(&crate::types::marked_messages(messages), add_assistant)?;
        Ok(crate::types::split_rendered(&rendered, messages))
    }

    /// Adds the input to the sequence. `Some` when there is nothing to decode.
    pub(super) fn start_append(&mut self, seq: i32, input: Input) -> Result<Option<PrefillStats>> {
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
    pub(super) fn prepare_logits(&mut self, seq: i32) -> Result<()> {
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

    pub(super) fn logits_ready(&self, seq: i32) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.last_logits.is_some())
    }

    pub(super) fn prepare_score(
        &mut self,
        seq: i32,
        candidates: &[String],
    ) -> Result<Vec<Vec<LlamaToken>>> {
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

    pub(super) fn start_generate(
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
                draft: Vec::new(),
                saved_logits: Vec::new(),
                draft_len: self.lookup_draft,
                sampling_seconds: 0.0,
                logprobs: Vec::new(),
                drafted: 0,
                accepted: 0,
            })),
        );
        Ok(())
    }

    pub(super) fn push_job(&mut self, seq: i32, kind: JobKind) {
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

    pub(super) fn fork(&mut self, src: i32, dst: i32) -> Result<()> {
        let copy = self.idle_seq(src)?.clone();
        if copy.n_decoded > 0 {
            self.ctx
                .copy_kv_cache_seq(src, dst, None, None)
                .map_err(|e| Error::Decode(e.to_string()))?;
        }
        self.seqs.insert(dst, copy);
        Ok(())
    }

    pub(super) fn truncate(&mut self, seq: i32, len: usize) -> Result<()> {
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

    pub(super) fn release(&mut self, seq: i32) {
        // A running request on a dropped sequence is abandoned: nobody can read its answer.
        self.jobs.retain(|j| j.seq != seq);
        if self.seqs.remove(&seq).is_some() {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        }
    }

    /// Writes the sequence's cache cells and tokens to `path` (atomically); returns the bytes
    /// written. The whole sequence must be decoded.
    pub(super) fn save_state(&mut self, seq: i32, path: &std::path::Path) -> Result<usize> {
        let state = self.idle_seq(seq)?;
        if state.tokens.is_empty() || state.n_decoded != state.tokens.len() {
            return Err(Error::InvalidParameter(
                "only a non-empty, fully decoded sequence can be saved".into(),
            ));
        }
        let tokens = state.tokens.clone();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let bytes = self
            .ctx
            .state_seq_save_file(&tmp, seq, &tokens)
            .map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(bytes)
    }

    /// Fills the empty sequence with the cache cells and tokens saved at `path`; returns the
    /// number of tokens.
    pub(super) fn load_state(&mut self, seq: i32, path: &std::path::Path) -> Result<usize> {
        let n_ctx = self.n_ctx;
        let state = self.idle_seq(seq)?;
        if !state.tokens.is_empty() {
            return Err(Error::InvalidParameter(
                "state can only be loaded into an empty sequence".into(),
            ));
        }
        let (tokens, _) = self
            .ctx
            .state_seq_load_file(path, seq, n_ctx)
            .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
        let n = tokens.len();
        let state = self.seqs.entry(seq).or_default();
        state.n_decoded = n;
        state.tokens = tokens;
        state.last_logits = None;
        Ok(n)
    }
}
