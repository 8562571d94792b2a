//! The flags of `geek compress …`, parsed straight into the library's types, and the jobs
//! they describe.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use geek_compress::blocks::{Granularity, ScaleInit};
use geek_compress::distill::LearnedConfig;
use geek_compress::export::FloatType;
use geek_compress::pipeline::{
    CalibrationText, FinetuneJob, PruneJob, PruneMethod, QuantMethod, QuantizeJob,
};
use geek_compress::prune::{MaskConfig, RecoverConfig};
use geek_compress::quantize::QuantType;
use geek_compress::train::TrainConfig;
use geek_compress::{AdapterConfig, AdapterKind, MixerInit, Target};

/// `geek compress …`
#[derive(Debug, Subcommand)]
pub enum CompressCommand {
    /// Train an adapter on (prompt, completion) JSONL on the CPU.
    Finetune(FinetuneArgs),
    /// Write a trained adapter as a merged GGUF, a GGUF LoRA or a PEFT adapter.
    Export(ExportArgs),
    /// Quantize a model into GGUF block types: round-to-nearest, or learned scales (QuantGPT).
    Quantize(QuantizeArgs),
    /// Finetune an adapter and merge it (--data), prune (--prune), and quantize the result
    /// into one GGUF, in one command.
    Pipeline(PipelineArgs),
    /// Structured pruning (SIMPLE's learned masks, or magnitude) into smaller GGUFs, each
    /// recovered by distillation.
    Prune(super::PruneArgs),
    /// Compress the retriever's sentence encoder by weight-inherited distillation (or the
    /// plain-distillation baseline), on StrategyQA train evidence.
    Wid(super::WidArgs),
    /// Write a model dequantized to f32 or f16 (the reference for quantization).
    Dequantize {
        /// Output GGUF.
        #[arg(long)]
        out: PathBuf,
        /// f32 or f16.
        #[arg(long, default_value = "f32")]
        r#type: FloatType,
    },
}

/// `geek compress finetune`
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The base model (GGUF path or catalogue name; default: --model).
    #[arg(long)]
    pub base: Option<String>,
    /// lora, moslora, loretta-rep or loretta-adp.
    #[arg(long, default_value = "lora")]
    pub adapter: AdapterKind,
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
    pub targets: Vec<Target>,
    /// Tensor-train rank of LoRETTA's cores.
    #[arg(long, default_value_t = 5)]
    pub tt_rank: usize,
    /// Adapters on the top N layers only (0 = all): no backward pass below them, and the
    /// frozen lower layers run once per example (kept for later epochs and resumes).
    #[arg(long, default_value_t = 0)]
    pub top_layers: usize,
    /// Where --top-layers keeps the lower layers' streams on disk (n_embd × 4 bytes a token;
    /// default OUT/lower-streams): a resumed run reads them back, and runs of other adapters
    /// on the same model, layer and examples share a directory given here.
    #[arg(long)]
    pub stream_cache: Option<PathBuf>,
    /// MoSLoRA mixer initialisation: kaiming or orthogonal.
    #[arg(long, default_value = "kaiming")]
    pub mixer_init: MixerInit,
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

impl FinetuneArgs {
    /// The finetune these flags describe.
    pub fn job(&self) -> FinetuneJob {
        FinetuneJob {
            adapter: AdapterConfig {
                kind: self.adapter,
                rank: self.rank,
                alpha: self.alpha,
                targets: self.targets.clone(),
                tt_rank: self.tt_rank,
                mixer_init: self.mixer_init,
                seed: self.seed,
                top_layers: self.top_layers,
            },
            train: TrainConfig {
                steps: self.steps,
                batch: self.batch,
                accumulation: self.accumulation,
                seq_len: self.seq_len,
                lr: self.lr,
                warmup: self.warmup,
                weight_decay: self.weight_decay,
                clip: self.clip,
                eval_every: self.eval_every,
                checkpoint_every: self.checkpoint_every,
                holdout: self.holdout,
                seed: self.seed,
                stream_cache: self.stream_cache.clone(),
                ..TrainConfig::default()
            },
            data: self.data.clone(),
            limit: self.limit,
            out: self.out.clone(),
        }
    }
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
    pub r#type: FloatType,
    /// Write a GGUF LoRA adapter (applied to the base at run time with `--lora FILE`).
    #[arg(long)]
    pub gguf_lora: Option<PathBuf>,
    /// Write a PEFT adapter directory.
    #[arg(long)]
    pub peft: Option<PathBuf>,
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
    pub r#type: QuantType,
    /// rtn (ggml's round-to-nearest) or learned (scales trained by distillation).
    #[arg(long, default_value = "rtn")]
    pub method: QuantMethod,
    #[command(flatten)]
    pub learned: LearnedArgs,
}

/// `geek compress pipeline`
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The base model (GGUF path or catalogue name; default: --model).
    #[arg(long)]
    pub base: Option<String>,
    /// lora, moslora or loretta-rep (loretta-adp has no mergeable form).
    #[arg(long, default_value = "lora")]
    pub adapter: AdapterKind,
    /// Training JSONL `{prompt, completion}` (e.g. from `geek data trajectories`); without
    /// it, nothing is finetuned.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Prune to this fraction of the non-embedding parameters before quantizing (see
    /// `compress prune`; llama and qwen2 models).
    #[arg(long)]
    pub prune: Option<f64>,
    /// learned or magnitude pruning.
    #[arg(long, default_value = "learned")]
    pub prune_method: PruneMethod,
    /// Mask-learning steps of pruning.
    #[arg(long, default_value_t = 100)]
    pub prune_steps: usize,
    /// Recovery steps after pruning.
    #[arg(long, default_value_t = 100)]
    pub recover_steps: usize,
    /// Peak learning rate of recovery.
    #[arg(long, default_value_t = 5e-5)]
    pub recover_lr: f64,
    /// Recover with low-rank updates of this rank instead of the kept weights (see `compress
    /// prune --recover-rank`).
    #[arg(long, default_value_t = 0)]
    pub recover_rank: usize,
    /// Quantized type of the result (q4_0, q8_0, …; see `quantize`).
    #[arg(long)]
    pub r#type: QuantType,
    /// The GGUF to write.
    #[arg(long)]
    pub out: PathBuf,
    /// rtn or learned quantization.
    #[arg(long, default_value = "learned")]
    pub method: QuantMethod,
    /// Quantize only the tensors the adapter changed (to --type, by rtn) and copy every other
    /// tensor from the base file as it is: the base's own blocks stay bit-exact, and a wide
    /// --type (q8_0) keeps the adapter's change above the rounding noise. Needs --data and
    /// --method rtn.
    #[arg(long)]
    pub keep_base: bool,
    /// Where the finetune keeps its checkpoint (resumed when rerun), adapter and loss curve,
    /// and pruning its sizes (in `prune/`) (default: OUT with extension `.work`).
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
    /// Adapters on the top N layers only (0 = all), the lower layers' streams kept in the
    /// finetune's directory (see `finetune --top-layers`).
    #[arg(long, default_value_t = 0)]
    pub top_layers: usize,
    /// Examples held out of the finetune.
    #[arg(long, default_value_t = 32)]
    pub holdout: usize,
    /// Use only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub learned: LearnedArgs,
}

impl PipelineArgs {
    /// The work directory.
    pub fn work(&self) -> PathBuf {
        self.work
            .clone()
            .unwrap_or_else(|| self.out.with_extension("work"))
    }

    /// The finetune part, when --data is given: all seven targets, α = 2r, the pipeline's
    /// schedule.
    pub fn finetune_job(&self) -> Option<FinetuneJob> {
        let data = self.data.clone()?;
        Some(FinetuneJob {
            adapter: AdapterConfig {
                kind: self.adapter,
                rank: self.rank,
                alpha: 2.0 * self.rank as f64,
                targets: Target::ALL.to_vec(),
                tt_rank: 5,
                mixer_init: MixerInit::Kaiming,
                seed: self.learned.seed,
                top_layers: self.top_layers,
            },
            train: TrainConfig {
                steps: self.finetune_steps,
                batch: 1,
                accumulation: self.accumulation,
                seq_len: self.finetune_seq_len,
                lr: self.finetune_lr,
                warmup: (self.finetune_steps / 10).max(1),
                eval_every: 0,
                checkpoint_every: 10,
                holdout: self.holdout,
                seed: self.learned.seed,
                ..TrainConfig::default()
            },
            data,
            limit: self.limit,
            out: self.work(),
        })
    }

    /// The pruning part, when --prune is given, on the quantization's calibration text.
    pub fn prune_job(&self, calibration: &CalibrationText) -> Option<PruneJob> {
        let keep = self.prune?;
        Some(PruneJob {
            method: self.prune_method,
            keeps: vec![keep],
            masks: MaskConfig {
                steps: self.prune_steps,
                batch: self.learned.batch,
                ..MaskConfig::default()
            },
            recover: RecoverConfig {
                steps: self.recover_steps,
                batch: self.learned.batch,
                lr: self.recover_lr,
                lora_rank: self.recover_rank,
                ..RecoverConfig::default()
            },
            calibration: calibration.clone(),
            out: self.work().join("prune"),
        })
    }
}

/// Options of quantization (all but --embedding-type only for the learned method).
#[derive(Debug, Args)]
pub struct LearnedArgs {
    /// Type of the token embedding and output layer (default: llama-quantize's, q8_0 here).
    #[arg(long)]
    pub embedding_type: Option<QuantType>,
    /// llama-quantize's mix of the type: Q4_K_M / Q5_K_M (--type q4_k / q5_k), Q3_K_M
    /// (q3_k) or Q2_K (q2_k) — the output layer in q6_k, attn_v / ffn_down (and for the 2- and
    /// 3-bit mixes attn_output) of the layers it picks wider, the embedding in the base type.
    /// Learned: the q2_k / q3_k / q4_k tensors learned, the q5_k / q6_k ones by rtn.
    #[arg(long)]
    pub medium: bool,
    /// Calibration text: a passage corpus (the StrategyQA paragraphs or vital-article JSON,
    /// or JSONL `{id, title, text}`), training data (JSONL `{prompt, completion}`, as `geek
    /// data trajectories` writes it: the model's chat format) or a plain .txt file (default:
    /// the StrategyQA paragraphs and vital articles of the data dir). Never the perplexity
    /// test text.
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
    pub granularity: Granularity,
    /// Initial scales: mse (least weight error per block), imatrix (that error weighted by
    /// each input column's mean squared activation on the calibration rows, as llama.cpp's
    /// importance matrix weighs it), ggml (ggml's own round-to-nearest blocks, byte for byte
    /// what --method rtn writes) or rtn (max magnitude on the grid's end).
    #[arg(long, default_value = "mse")]
    pub init: ScaleInit,
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

impl LearnedArgs {
    /// The quantization these flags describe, of type `ty` into `out`; calibration text from
    /// `--calib` or the data directory's default corpus.
    pub fn job(
        &self,
        ty: QuantType,
        method: QuantMethod,
        out: PathBuf,
        data_dir: &std::path::Path,
    ) -> QuantizeJob {
        QuantizeJob {
            ty,
            method,
            medium: self.medium,
            learned: LearnedConfig {
                ty,
                embedding: self.embedding_type,
                granularity: self.granularity,
                init: self.init,
                train_weights: self.qat,
                steps: self.steps,
                batch: self.batch,
                lr: self.lr,
                weight_lr: self.weight_lr,
                contrastive_weight: self.contrastive_weight,
                temperature: self.temperature,
                memory_bank: self.memory_bank,
                eval_every: self.eval_every,
                ..LearnedConfig::default()
            },
            calibration: CalibrationText::new(
                &self.calib,
                data_dir,
                self.calib_rows,
                self.seq_len,
                self.seed,
            ),
            out,
        }
    }
}
