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
    /// Tokens drafted by prompt lookup per greedy step (0 turns drafting off; outputs are the
    /// same either way).
    #[arg(long, global = true, default_value_t = geek_backend::DEFAULT_LOOKUP_DRAFT)]
    pub lookup_draft: usize,
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
    /// Make the agent's model: train adapters, export GGUF.
    #[command(subcommand)]
    Compress(Box<CompressCommand>),
}

/// `geek ppl`
#[derive(Debug, Args)]
pub struct PplArgs {
    /// Text file (default: WikiText-2 test, `wikitext2/wiki.test.raw` in the data directory;
    /// CRLF is read as LF).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// At most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `geek compress …`
#[derive(Debug, Subcommand)]
pub enum CompressCommand {
    /// Train an adapter on (prompt, completion) JSONL on the CPU.
    Finetune(FinetuneArgs),
    /// Write a trained adapter as a merged GGUF, a GGUF LoRA or a PEFT adapter.
    Export(ExportArgs),
    /// Quantize a model into GGUF block types: round-to-nearest, or learned scales (QuantGPT).
    Quantize(QuantizeArgs),
    /// Finetune an adapter, merge it and quantize the result into one GGUF, in one command.
    Pipeline(PipelineArgs),
    /// Write a model dequantized to f32 or f16 (the reference for quantization).
    Dequantize {
        /// Output GGUF.
        #[arg(long)]
        out: PathBuf,
        /// f32 or f16.
        #[arg(long, default_value = "f32")]
        r#type: String,
    },
}

/// `geek compress pipeline`
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The base model (GGUF path or catalogue name; default: --model).
    #[arg(long)]
    pub base: Option<String>,
    /// lora, moslora or loretta-rep (loretta-adp has no mergeable form).
    #[arg(long, default_value = "lora")]
    pub adapter: String,
    /// Training JSONL `{prompt, completion}` (e.g. from `geek data trajectories`).
    #[arg(long)]
    pub data: PathBuf,
    /// Quantized type of the result (q4_0, q8_0, …; see `quantize`).
    #[arg(long)]
    pub r#type: String,
    /// The GGUF to write.
    #[arg(long)]
    pub out: PathBuf,
    /// rtn or learned quantization.
    #[arg(long, default_value = "learned", value_parser = ["rtn", "learned"])]
    pub method: String,
    /// Where the finetune keeps its checkpoint (resumed when rerun), adapter and loss curve
    /// (default: OUT with extension `.work`).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Finetune optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub finetune_steps: usize,
    /// Finetune peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub finetune_lr: f64,
    /// Finetune tokens per row.
    #[arg(long, default_value_t = 1536)]
    pub finetune_seq_len: usize,
    /// Finetune rows accumulated per step.
    #[arg(long, default_value_t = 4)]
    pub accumulation: usize,
    /// Examples held out of the finetune.
    #[arg(long, default_value_t = 32)]
    pub holdout: usize,
    /// Use only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub learned: LearnedArgs,
}

/// `geek compress quantize`
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model to quantize (default: --model); read dequantized to f32 first.
    #[arg(long = "in")]
    pub input: Option<String>,
    /// Output GGUF.
    #[arg(long)]
    pub out: PathBuf,
    /// q8_0, q4_0, q4_1, q5_0, q5_1, q2_k … q6_k, f16, f32 (learned: q8_0, q4_0, q4_1, q5_0,
    /// q2_k).
    #[arg(long)]
    pub r#type: String,
    /// rtn (ggml's round-to-nearest) or learned (scales trained by distillation).
    #[arg(long, default_value = "rtn", value_parser = ["rtn", "learned"])]
    pub method: String,
    #[command(flatten)]
    pub learned: LearnedArgs,
}

/// Options of quantization (all but --embedding-type only for the learned method).
#[derive(Debug, Args)]
pub struct LearnedArgs {
    /// Type of the token embedding and output layer (default: llama-quantize's, q8_0 here).
    #[arg(long)]
    pub embedding_type: Option<String>,
    /// Calibration text: a passage corpus (the StrategyQA paragraphs or vital-article JSON,
    /// or JSONL `{id, title, text}`) or a plain .txt file (default: the StrategyQA paragraphs
    /// and vital articles of the data dir). Never the perplexity test text.
    #[arg(long)]
    pub calib: Vec<PathBuf>,
    /// Calibration rows (the last 4 are held out).
    #[arg(long, default_value_t = 68)]
    pub calib_rows: usize,
    /// Tokens per calibration row.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Optimizer steps (0: initial scales only).
    #[arg(long, default_value_t = 60)]
    pub steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Peak learning rate of the scale factors γ (clip threshold / mean|w|, about 3–10).
    #[arg(long, default_value_t = 4e-2)]
    pub lr: f64,
    /// Measure the held-out KL every N steps; the best scales measured are kept.
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Also train the weights (quantization-aware training).
    #[arg(long)]
    pub qat: bool,
    /// Peak learning rate of the weights (with --qat).
    #[arg(long, default_value_t = 1e-5)]
    pub weight_lr: f64,
    /// Who shares a scale: block, row or module.
    #[arg(long, default_value = "block")]
    pub granularity: String,
    /// Initial scales: mse (least weight error per block) or rtn.
    #[arg(long, default_value = "mse", value_parser = ["mse", "rtn"])]
    pub init: String,
    /// Weight of the token-level contrastive loss (0: logit distillation only).
    #[arg(long, default_value_t = 0.1)]
    pub contrastive_weight: f64,
    /// Temperature of the contrastive loss.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    /// Teacher token representations kept as extra negatives.
    #[arg(long, default_value_t = 2048)]
    pub memory_bank: usize,
    /// Shuffling seed for the calibration passages.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the run's summary (config, KL before/after) as JSON here.
    #[arg(long)]
    pub summary: Option<PathBuf>,
}

/// `geek compress finetune`
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The base model (GGUF path or catalogue name; default: --model).
    #[arg(long)]
    pub base: Option<String>,
    /// lora, moslora, loretta-rep or loretta-adp.
    #[arg(long, default_value = "lora")]
    pub adapter: String,
    /// Training JSONL `{prompt, completion}` (e.g. from `geek data trajectories`).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory: checkpoint (resumed when present), adapter, loss curve, summary.
    #[arg(long)]
    pub out: PathBuf,
    /// Rank r (LoRETTA_adp: bottleneck width).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// α; updates are scaled by α/r.
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Target modules, comma-separated (q, k, v, o, gate, up, down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// Tensor-train rank of LoRETTA's cores.
    #[arg(long, default_value_t = 5)]
    pub tt_rank: usize,
    /// MoSLoRA mixer initialisation: kaiming or orthogonal.
    #[arg(long, default_value = "kaiming")]
    pub mixer_init: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub accumulation: usize,
    /// Tokens per packed row (longer examples keep their end).
    #[arg(long, default_value_t = 1536)]
    pub seq_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Held-out loss every N steps (0 = at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// Examples held out (the file's last N).
    #[arg(long, default_value_t = 32)]
    pub holdout: usize,
    /// Use only the file's first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `geek compress export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The base model the adapter was trained on (default: --model).
    #[arg(long)]
    pub base: Option<String>,
    /// The adapter directory (`<finetune --out>/adapter`).
    #[arg(long)]
    pub adapter_dir: PathBuf,
    /// Write base + adapter merged into this GGUF.
    #[arg(long)]
    pub merged: Option<PathBuf>,
    /// Element type of the merged GGUF's matrices: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub r#type: String,
    /// Write a GGUF LoRA adapter (load with the base at run time).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Write a PEFT adapter directory.
    #[arg(long)]
    pub peft: Option<PathBuf>,
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
        /// Of the default corpus, only the vital-article summaries: no StrategyQA evidence
        /// paragraphs (the setting of a user without oracle passages).
        #[arg(long, conflicts_with = "corpora")]
        vital_only: bool,
        /// Where to write the index (default: --index).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `geek eval strategyqa`
#[derive(Debug, Args)]
pub struct EvalQaArgs {
    /// dev, train, full, test or a file path (default: dev; for calibrate: train).
    #[arg(long)]
    pub split: Option<String>,
    /// direct, cot, rag, self-ask, ircot or geek.
    #[arg(long, default_value = "geek")]
    pub method: geek_evals::methods::Method,
    /// Pre-answer drafting (geek).
    #[arg(long)]
    pub pre_answer: bool,
    /// Passages shown per retrieval (geek).
    #[arg(long, default_value_t = 3)]
    pub passages: usize,
    /// Solved StrategyQA train questions shown before each question (geek).
    #[arg(long, default_value_t = 0)]
    pub demos: usize,
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
    /// Fit the yes/no decision offset of a method on StrategyQA train questions (resumable);
    /// `ask`, the TUI and `eval` apply it.
    Calibrate(EvalQaArgs),
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
    /// Answer by the raw yes/no log-probabilities, without the calibration offset.
    #[arg(long)]
    pub no_calibration: bool,
    /// Solved StrategyQA train questions shown before the question (the most similar ones).
    #[arg(long, default_value_t = 0)]
    pub demos: usize,
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
    /// Where an excavation's time goes, against the engine's raw pp/tg rates.
    Agent(BenchAgentArgs),
}

/// `geek bench agent`
#[derive(Debug, Args)]
pub struct BenchAgentArgs {
    /// Questions: a StrategyQA JSON file or a text file with one question per line
    /// (default: --split).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// StrategyQA split the questions come from when --questions is not given.
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Only the first N questions.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Questions excavated at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
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
