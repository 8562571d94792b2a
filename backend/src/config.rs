//! How an [`Engine`](crate::Engine) is set up.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings for loading a model into an [`Engine`](crate::Engine).
///
/// ```
/// let config = geek_backend::EngineConfig::new("model.gguf").with_threads(2).with_n_ctx(2048);
/// assert_eq!(config.threads, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// The GGUF file.
    pub model: PathBuf,
    /// Context size in tokens, shared by all live sequences (one unified KV cache).
    pub n_ctx: u32,
    /// Most tokens handed to one `llama_decode` call.
    pub n_batch: u32,
    /// Physical micro-batch size.
    pub n_ubatch: u32,
    /// Threads for generation. Set explicitly: llama.cpp's own default (4) halves speed on a
    /// 2-core machine.
    pub threads: i32,
    /// Threads for prompt processing.
    pub threads_batch: i32,
    /// Layers offloaded to the GPU (needs the `cuda` feature; ignored on CPU builds).
    pub n_gpu_layers: u32,
    /// How many sequences may be alive at once (including the engine's scratch sequences).
    pub max_sequences: u32,
    /// Flash attention in llama.cpp. `Auto` (on, on CPU) by default because only then do
    /// results not depend on how tokens were batched: without it, on this CPU build, the same
    /// tokens decoded one at a time, in chunks, or next to other sequences give logits up to
    /// ~1.0 apart (F16 cache) or ~0.5 apart (F32 cache). `Disabled` is faster once contexts
    /// grow (an agent question: ~180 against ~76 tokens/s) at that price.
    pub flash_attention: FlashAttention,
    /// Element type of the KV cache (F16 by default).
    pub kv_type: KvType,
    /// GGUF LoRA adapters loaded with the model; switch between them with
    /// [`Engine::set_lora`](crate::Engine::set_lora).
    pub lora_adapters: Vec<PathBuf>,
    /// Prompt-lookup drafting: greedy generations draft up to this many tokens by matching
    /// the sequence's last n-gram earlier in it, verified in the same decode (outputs are
    /// those of greedy decoding up to the model's batch-dependence; see
    /// [`DEFAULT_LOOKUP_DRAFT`]). 0 turns it off.
    #[serde(default)]
    pub lookup_draft: usize,
}

/// Tokens drafted by prompt lookup unless configured otherwise: off. Measured with
/// `geek bench agent` on Qwen2.5-Coder-1.5B (2 threads), drafting 4 made agent generation
/// slower (29.3 against 37.0 tokens/s: most drafts of extracted facts are rejected), and
/// batched verification does not reproduce one-at-a-time greedy decoding exactly on every
/// model; turn it on with `--lookup-draft N` where it pays.
pub const DEFAULT_LOOKUP_DRAFT: usize = 0;

impl EngineConfig {
    /// Defaults: 4096-token context, 512-token batches, one thread per available core.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        let threads = default_threads();
        EngineConfig {
            model: model.into(),
            n_ctx: 4096,
            n_batch: 512,
            n_ubatch: 512,
            threads,
            threads_batch: threads,
            n_gpu_layers: 0,
            max_sequences: 32,
            flash_attention: FlashAttention::Auto,
            kv_type: KvType::F16,
            lora_adapters: Vec::new(),
            lookup_draft: DEFAULT_LOOKUP_DRAFT,
        }
    }

    /// Sets both generation and prompt threads.
    pub fn with_threads(mut self, threads: i32) -> Self {
        self.threads = threads;
        self.threads_batch = threads;
        self
    }

    /// Sets the context size.
    pub fn with_n_ctx(mut self, n_ctx: u32) -> Self {
        self.n_ctx = n_ctx;
        self
    }

    /// Sets the number of sequences that may be alive at once.
    pub fn with_max_sequences(mut self, n: u32) -> Self {
        self.max_sequences = n;
        self
    }

    /// Adds a GGUF LoRA adapter to load with the model.
    pub fn with_lora(mut self, path: impl Into<PathBuf>) -> Self {
        self.lora_adapters.push(path.into());
        self
    }
}

/// Whether llama.cpp uses its flash-attention kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlashAttention {
    /// llama.cpp decides (on where the backend supports it).
    #[default]
    Auto,
    /// Always on.
    Enabled,
    /// Always off.
    Disabled,
}

impl FlashAttention {
    /// llama.cpp's `llama_flash_attn_type` value.
    pub(crate) fn llama_policy(self) -> i32 {
        match self {
            FlashAttention::Auto => -1,
            FlashAttention::Enabled => 1,
            FlashAttention::Disabled => 0,
        }
    }
}

impl std::str::FromStr for FlashAttention {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(FlashAttention::Auto),
            "on" | "enabled" => Ok(FlashAttention::Enabled),
            "off" | "disabled" => Ok(FlashAttention::Disabled),
            other => Err(format!(
                "flash attention must be auto, on or off, not {other:?}"
            )),
        }
    }
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    #[default]
    F16,
}

impl KvType {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }

    pub(crate) fn llama_type(self) -> llama_cpp_2::context::params::KvCacheType {
        match self {
            KvType::F32 => llama_cpp_2::context::params::KvCacheType::F32,
            KvType::F16 => llama_cpp_2::context::params::KvCacheType::F16,
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            other => Err(format!("KV cache type must be f32 or f16, not {other:?}")),
        }
    }
}

/// One thread per available core (2 on the reference machine).
pub fn default_threads() -> i32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as i32)
        .unwrap_or(2)
}
