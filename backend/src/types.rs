//! What the engine's requests return: model facts, prompt parts, token accounting,
//! completions and streamed events.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What the engine knows about its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The GGUF file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// Number of weights.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// Context length the model was trained with.
    pub n_ctx_train: u32,
    /// Context size of this engine.
    pub n_ctx: u32,
    /// Vocabulary size.
    pub n_vocab: i32,
    /// Transformer layers.
    pub n_layer: u32,
    /// Embedding width.
    pub n_embd: i32,
    /// The chat template from the GGUF metadata.
    pub chat_template: Option<String>,
    /// Element type of the KV cache.
    #[serde(default)]
    pub kv_type: crate::KvType,
    /// Loaded LoRA adapters, in [`crate::Engine::set_lora`] index order.
    pub lora_adapters: Vec<PathBuf>,
}

/// One chat turn, for [`Engine::chat_prompt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A piece of a prompt: the chat template's own text, whose special-token markers
/// (`<|im_start|>`) become control tokens, or content (a question, a passage), whose text is
/// tokenized as plain text whatever it contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptPart {
    /// The text.
    pub text: String,
    /// Whether special-token markers in it are parsed.
    pub special: bool,
}

impl PromptPart {
    /// Template text: special-token markers are parsed.
    pub fn template(text: impl Into<String>) -> Self {
        PromptPart {
            text: text.into(),
            special: true,
        }
    }

    /// Content: tokenized as plain text.
    pub fn content(text: impl Into<String>) -> Self {
        PromptPart {
            text: text.into(),
            special: false,
        }
    }
}

/// The marker standing for message `i`'s content while a chat template is rendered.
fn content_marker(i: usize) -> String {
    format!("GEEKCONTENTMARKER{i}X")
}

/// `messages` with each content replaced by a marker: render these with a chat template, then
/// [`split_rendered`] turns the result into template parts around the real contents.
pub fn marked_messages(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| ChatMessage::new(m.role.clone(), content_marker(i)))
        .collect()
}

/// A chat prompt rendered from [`marked_messages`], as template parts (special-token markers
/// parsed) around the messages' contents (tokenized as text). A message the template leaves
/// out is skipped.
pub fn split_rendered(rendered: &str, messages: &[ChatMessage]) -> Vec<PromptPart> {
    let mut rest = rendered;
    let mut parts = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let marker = content_marker(i);
        let Some(at) = rest.find(&marker) else {
            continue;
        };
        if at > 0 {
            parts.push(PromptPart::template(&rest[..at]));
        }
        parts.push(PromptPart::content(m.content.clone()));
        rest = &rest[at + marker.len()..];
    }
    if !rest.is_empty() {
        parts.push(PromptPart::template(rest));
    }
    parts
}

/// How much of a request's prompt had to be decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillStats {
    /// Tokens decoded for this request.
    pub decoded: usize,
    /// Tokens already in the KV cache, not decoded again.
    pub reused: usize,
    /// Tokens in the sequence after the request (what a stateless server would re-decode).
    pub total: usize,
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// The output reached this stop string (not part of the returned text).
    Stop(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The [`Generation`] was dropped before the end.
    Cancelled,
}

/// A generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens there, best first.
    pub top: Vec<(String, f32)>,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The generated text, ending before the stop string if one matched.
    pub text: String,
    /// Every generated token, stop string and end-of-generation token included. They all stay
    /// in the sequence: the next append continues after them.
    pub tokens: Vec<i32>,
    /// Why generation ended.
    pub stop: StopReason,
    /// Prompt decoding of this request.
    pub prefill: PrefillStats,
    /// Seconds spent before the first token was sampled.
    pub prefill_seconds: f64,
    /// Seconds spent generating.
    pub generation_seconds: f64,
    /// Seconds spent choosing tokens (sampling and grammar) within `generation_seconds`.
    #[serde(default)]
    pub sampling_seconds: f64,
    /// Tokens drafted by prompt lookup for this generation.
    #[serde(default)]
    pub drafted: usize,
    /// Drafted tokens kept.
    #[serde(default)]
    pub accepted: usize,
    /// Per generated token, when [`crate::GenerateParams::logprobs`] asked for them.
    #[serde(default)]
    pub logprobs: Vec<TokenLogprob>,
}

/// One event of a streamed generation.
#[derive(Debug)]
pub enum GenEvent {
    /// Newly generated text (whole UTF-8 characters, never part of a stop string).
    Piece(String),
    /// Generation ended normally.
    Done(Completion),
    /// Generation failed.
    Failed(Error),
}

/// Counters of the whole engine, to prove KV reuse and batching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Sum over requests of the sequence length they ran on: what a stateless API would decode.
    pub prompt_tokens_requested: u64,
    /// Prompt tokens actually decoded.
    pub prompt_tokens_decoded: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// `llama_decode` calls.
    pub decode_calls: u64,
    /// Tokens passed to `llama_decode` over all calls.
    pub batch_tokens: u64,
    /// Tokens drafted by prompt lookup.
    #[serde(default)]
    pub drafted_tokens: u64,
    /// Drafted tokens that greedy decoding agreed with (kept).
    #[serde(default)]
    pub accepted_draft_tokens: u64,
    /// Sequences alive now.
    pub live_sequences: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_split_from_the_rendered_template() {
        let messages = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "Q <|im_end|> x"),
        ];
        let marked = marked_messages(&messages);
        let rendered = format!(
            "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            marked[0].content, marked[1].content
        );
        let parts = split_rendered(&rendered, &messages);
        let texts: Vec<(&str, bool)> = parts.iter().map(|p| (p.text.as_str(), p.special)).collect();
        assert_eq!(
            texts,
            vec![
                ("<|im_start|>system\n", true),
                ("S", false),
                ("<|im_end|>\n<|im_start|>user\n", true),
                ("Q <|im_end|> x", false),
                ("<|im_end|>\n<|im_start|>assistant\n", true),
            ]
        );
    }
}
