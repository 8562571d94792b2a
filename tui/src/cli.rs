//! The command line: the global flags (resolved once into [`crate::config::Resolved`]) and the
//! subcommands, whose own flags sit beside their handlers in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::commands::ask::AskArgs;
use crate::commands::bench::BenchCommand;
use crate::commands::data::DataCommand;
use crate::commands::eval::EvalCommand;
use crate::commands::generate::GenerateArgs;
use crate::commands::index::{IndexCommand, SearchArgs};
use crate::commands::model::ModelCommand;
use crate::commands::ppl::PplArgs;

/// geek: answers implicit multi-hop questions by excavating knowledge step by step with a
/// small local LLM.
#[derive(Debug, Parser)]
#[command(name = "geek", version, about)]
pub struct Cli {
    /// Global settings.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do (default: the interactive terminal UI).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Settings every subcommand shares.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Model: a .gguf path or a catalogue name (see `geek model list`).
    #[arg(long, global = true, env = "GEEK_MODEL")]
    pub model: Option<String>,
    /// Where catalogue models are stored.
    #[arg(long, global = true, env = "GEEK_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// llama.cpp threads (default: one per core).
    #[arg(long, global = true, env = "GEEK_THREADS")]
    pub threads: Option<i32>,
    /// Context size in tokens.
    #[arg(long, global = true, default_value_t = 4096)]
    pub n_ctx: u32,
    /// Flash attention: auto, on or off (off is faster once contexts grow, but then results
    /// depend on batching).
    #[arg(long, global = true, default_value = "auto")]
    pub flash_attn: geek_backend::FlashAttention,
    /// KV cache type: f16 or f32.
    #[arg(long, global = true, default_value = "f16")]
    pub kv_type: geek_backend::KvType,
    /// The shared data directory (StrategyQA, Wikipedia corpora).
    #[arg(long, global = true, env = "GEEK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The BM25 index directory.
    #[arg(long, global = true, env = "GEEK_INDEX")]
    pub index: Option<PathBuf>,
    /// Where the agent's passages come from: bm25, dense (the index's sentence embeddings,
    /// `geek index embed` first) or hybrid (both, weighted reciprocal rank fusion).
    #[arg(long, global = true, env = "GEEK_RETRIEVER", default_value = "bm25")]
    pub retriever: crate::passages::PassageSource,
    /// Sentence encoder of dense retrieval: a catalogue name or a model directory.
    #[arg(
        long,
        global = true,
        env = "GEEK_ENCODER",
        default_value = "all-minilm-l6-v2"
    )]
    pub encoder: String,
    /// Weights of BM25 and dense in hybrid fusion.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "1,1",
        num_args = 2
    )]
    pub hybrid_weights: Vec<f32>,
    /// Layers to offload to a GPU (needs a `cuda` build).
    #[arg(long, global = true, default_value_t = 0)]
    pub n_gpu_layers: u32,
    /// A GGUF LoRA adapter applied at run time, unmerged: `FILE` or `FILE:SCALE` (default
    /// scale 1; `geek compress export --gguf-lora` writes one).
    #[arg(long, global = true, env = "GEEK_LORA")]
    pub lora: Option<LoraSpec>,
    /// What runs on `--lora`: everything, or only the final yes/no answers (the agent's final
    /// answer, a baseline's transcript), the excavation steps staying on the base weights.
    #[arg(long, global = true, value_enum, default_value_t = LoraScope::All, env = "GEEK_LORA_SCOPE")]
    pub lora_scope: LoraScope,
    /// Tokens drafted by prompt lookup per greedy step (0 turns drafting off; outputs are the
    /// same either way).
    #[arg(long, global = true, default_value_t = geek_backend::DEFAULT_LOOKUP_DRAFT)]
    pub lookup_draft: usize,
}

/// What runs on the `--lora` adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraScope {
    /// Every prompt.
    All,
    /// Final yes/no answers only (for an adapter trained on them: `geek data trajectories
    /// --render final-answer`).
    Answer,
}

/// `--lora FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The GGUF LoRA file.
    pub path: PathBuf,
    /// Its scale.
    pub scale: f32,
}

impl std::str::FromStr for LoraSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // A path may hold ':' itself: only a number after the last one is a scale.
        let (path, scale) = match s.rsplit_once(':') {
            Some((path, scale)) if !path.is_empty() => match scale.parse::<f32>() {
                Ok(v) if v.is_finite() => (path, v),
                Ok(_) => return Err(format!("the scale of `{s}` is not finite")),
                Err(_) => (s, 1.0),
            },
            _ => (s, 1.0),
        };
        if path.is_empty() {
            return Err("--lora needs a file".into());
        }
        Ok(LoraSpec {
            path: PathBuf::from(path),
            scale,
        })
    }
}

/// Where the model runs (`ask`, `eval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// llama.cpp in this process.
    Local,
    /// An OpenAI-compatible server (llama-server or `geek serve`) at `--endpoint`.
    Openai,
}

/// The model server flags of the commands that run the agent.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Where the model runs (`openai` is implied by `--endpoint`).
    #[arg(long, value_enum, default_value = "local")]
    pub backend: BackendKind,
    /// Base URL of the model server (llama-server or `geek serve`); repeated (or
    /// comma-separated), several servers of one model share the questions.
    #[arg(long, env = "GEEK_ENDPOINT", value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// Bearer key for the model server.
    #[arg(long, env = "GEEK_ENDPOINT_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name sent to the server (default: the first one it lists).
    #[arg(long)]
    pub remote_model: Option<String>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The interactive terminal UI (also what `geek` alone opens).
    Tui,
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Answer a yes/no question by excavating knowledge step by step.
    Ask(AskArgs),
    /// Generate text from a prompt with the loaded model.
    Generate(GenerateArgs),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build the BM25 passage index.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Search the passage index.
    Search(SearchArgs),
    /// Evaluate on StrategyQA.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Prepare training data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Perplexity of a model on a text, computed as llama.cpp's llama-perplexity does.
    Ppl(PplArgs),
    /// Serve the model over HTTP: OpenAI-compatible completions and chat, and /v1/ask.
    Serve(crate::serve::ServeArgs),
    /// Make the agent's model: train adapters, export GGUF.
    #[command(subcommand)]
    Compress(Box<crate::commands::CompressCommand>),
}

#[cfg(test)]
mod tests {
    use super::LoraSpec;

    #[test]
    fn lora_specs_read_a_scale_only_after_the_last_colon() {
        let spec: LoraSpec = "a/b.gguf:0.5".parse().unwrap();
        assert_eq!((spec.path.to_str().unwrap(), spec.scale), ("a/b.gguf", 0.5));
        let spec: LoraSpec = "a/b.gguf".parse().unwrap();
        assert_eq!(spec.scale, 1.0);
        let spec: LoraSpec = "c:/x.gguf".parse().unwrap();
        assert_eq!(
            (spec.path.to_str().unwrap(), spec.scale),
            ("c:/x.gguf", 1.0)
        );
        assert!("f.gguf:inf".parse::<LoraSpec>().is_err());
        assert!("".parse::<LoraSpec>().is_err());
    }
}
