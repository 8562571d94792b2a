//! Command-line flags, parsed once by clap and then resolved into [`crate::config::Resolved`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Layers to offload to a GPU (needs a `cuda` build).
    #[arg(long, global = true, default_value_t = 0)]
    pub n_gpu_layers: u32,
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
}

/// `geek data …`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Render StrategyQA train questions as gold excavations in the agent's prompt format:
    /// JSONL `{qid, prompt, completion}` for `geek compress finetune`.
    Trajectories(TrajectoriesArgs),
}

/// `geek data trajectories`
#[derive(Debug, Args)]
pub struct TrajectoriesArgs {
    /// `train` or a file path; dev is refused (never train on what is evaluated).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Passages shown per retrieval (the agent's default is 3).
    #[arg(long, default_value_t = 3)]
    pub passages: usize,
}

/// `geek index …`
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Build (or rebuild) the index from passage corpora.
    Build {
        /// Corpus files: the StrategyQA paragraphs JSON, the vital-article summaries JSON, or
        /// JSONL `{id, title, section?, text}` (default: the first two from the data directory).
        #[arg(long = "corpus")]
        corpora: Vec<PathBuf>,
        /// Where to write the index (default: --index).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `geek eval strategyqa`
#[derive(Debug, Args)]
pub struct EvalQaArgs {
    /// dev, train, full, test or a file path.
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// direct, cot, rag or geek.
    #[arg(long, default_value = "geek")]
    pub method: geek_evals::methods::Method,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Questions answered at once, as parallel sequences of one llama.cpp context.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Branches explored per question (geek).
    #[arg(long, default_value_t = 1)]
    pub explore: usize,
    /// Step budget (geek).
    #[arg(long, default_value_t = 8)]
    pub max_steps: usize,
    /// Seed of sampled branches.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Output directory.
    #[arg(long, default_value = "runs")]
    pub out: PathBuf,
}

/// `geek search`
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Any text.
    pub query: String,
    /// How many passages.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Where to search: the local index, a web provider, or both fused.
    #[arg(long, value_enum, default_value = "local")]
    pub source: SearchSource,
    /// Web provider for `--source web|hybrid`.
    #[arg(long, value_enum, default_value = "mediawiki")]
    pub web_provider: WebProviderArg,
    /// Base URL of the web provider: a SearxNG instance, or a MediaWiki api.php.
    #[arg(
        long,
        env = "GEEK_WEB_URL",
        default_value = "https://en.wikipedia.org/w/api.php"
    )]
    pub web_url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--source`
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SearchSource {
    /// The BM25 index.
    Local,
    /// The web provider.
    Web,
    /// Both, fused by reciprocal rank fusion.
    Hybrid,
}

/// `--web-provider`
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum WebProviderArg {
    /// A SearxNG instance's JSON API.
    Searxng,
    /// A MediaWiki search + extracts API.
    Mediawiki,
}

/// `geek eval …`
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Answer StrategyQA questions with a method and measure accuracy (resumable).
    Strategyqa(EvalQaArgs),
    /// Compare runs: a Markdown table and PNG plots.
    Report {
        /// Directories holding results_*.json files.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to write report.md and the plots (default: the first directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Recall@10 of gold evidence paragraphs (official StrategyQA definition).
    Retrieval {
        /// dev, train, full, test or a file path.
        #[arg(long, default_value = "dev")]
        split: String,
        /// question (IR-Q) or decomposition (IR-ORA-D).
        #[arg(long, default_value = "question")]
        mode: geek_evals::retrieval::QueryMode,
        /// Cut-off.
        #[arg(short, long, default_value_t = 10)]
        k: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `geek model …`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fetch a catalogue model (default: the default model) into the models directory.
    Pull {
        /// Catalogue name.
        name: Option<String>,
    },
    /// List catalogue models and whether they are present.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print architecture, size, quantization, context length and chat template of a GGUF.
    Info {
        /// A .gguf path or catalogue name (default: --model or the default model).
        model: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `geek ask`
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The yes/no question.
    pub question: String,
    /// Actions per branch before the final answer is forced.
    #[arg(long, default_value_t = 8)]
    pub max_steps: usize,
    /// Branches to explore; their answers are voted.
    #[arg(long, default_value_t = 1)]
    pub explore: usize,
    /// Answer sub-questions from the model alone.
    #[arg(long)]
    pub no_retrieval: bool,
    /// Draft remaining sub-questions with guessed answers to guide retrieval.
    #[arg(long)]
    pub pre_answer: bool,
    /// Passages shown per retrieval.
    #[arg(long, default_value_t = 3)]
    pub passages: usize,
    /// Print the trace as JSON instead of the excavation as it happens.
    #[arg(long)]
    pub json: bool,
}

/// `geek generate`
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Send the prompt as is instead of wrapping it in the model's chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message (chat mode).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k.
    #[arg(long, default_value_t = 40)]
    pub top_k: i32,
    /// Top-p.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Repeat penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// A GBNF grammar file the output must follow.
    #[arg(long)]
    pub grammar: Option<PathBuf>,
    /// Print the completion as JSON instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// `geek bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// llama-bench style throughput of the llama.cpp backend.
    Backend(BenchBackendArgs),
}

/// `geek bench backend`
#[derive(Debug, Args)]
pub struct BenchBackendArgs {
    /// Prompt lengths to measure (pp).
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub pp: Vec<usize>,
    /// Generation lengths to measure (tg).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub tg: Vec<usize>,
    /// Parallel sequences for batched generation.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub parallel: Vec<usize>,
    /// Tokens each parallel sequence generates.
    #[arg(long, default_value_t = 64)]
    pub batched_tokens: usize,
    /// Measured repetitions per test (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
