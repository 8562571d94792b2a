//! `geek compress prune`: structured pruning into one or more sizes, each recovered by
//! distillation and written as a GGUF (optionally quantized too).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use geek_compress::pipeline::{
    self, CalibrationText, PipelineEvent, PruneJob, PruneMethod, PrunedSize,
};
use geek_compress::prune::{MaskConfig, PruneEvent, RecoverConfig};
use geek_compress::quantize::{quantize_rtn, QuantType};
use geek_compress::BaseWeights;
use indicatif::ProgressBar;

use super::tokenizer;
use crate::config::Resolved;

/// `geek compress prune`
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The model to prune (a llama or qwen2 GGUF; default: --model); read dequantized to f32 first.
    #[arg(long = "in")]
    pub input: Option<String>,
    /// Fractions of the non-embedding parameters to keep, one model each (`0.75,0.5`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub keep: Vec<f64>,
    /// learned (SIMPLE's masks) or magnitude (L2 norms, the same fraction of every component).
    #[arg(long, default_value = "learned")]
    pub method: PruneMethod,
    /// The directory written: `keep-R.gguf` (f32) and `keep-R.json` per size, `masks.json`;
    /// checkpoints while running (a rerun resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// Mask-learning steps (learned method).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Learning rate of the masks.
    #[arg(long, default_value_t = 5e-2)]
    pub mask_lr: f64,
    /// Recovery (distillation) steps of each size.
    #[arg(long, default_value_t = 100)]
    pub recover_steps: usize,
    /// Peak learning rate of recovery.
    #[arg(long, default_value_t = 5e-5)]
    pub recover_lr: f64,
    /// Recover with low-rank (LoRA) updates of this rank, merged afterwards, instead of
    /// training the kept weights themselves (0): a few % of the trainable weights (rank 16:
    /// 1.5% on the 1.5B) — what a 1.5B model needs on 24 GB. Give it a ~10–20× larger
    /// --recover-lr.
    #[arg(long, default_value_t = 0)]
    pub recover_rank: usize,
    /// Calibration rows per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Calibration text: passage corpora, training data (JSONL `{prompt, completion}`) or
    /// .txt files (default: the data dir's StrategyQA paragraphs and vital articles; never
    /// the perplexity test text).
    #[arg(long)]
    pub calib: Vec<PathBuf>,
    /// Calibration rows (the last 4 are held out).
    #[arg(long, default_value_t = 404)]
    pub calib_rows: usize,
    /// Tokens per calibration row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Also write each size round-to-nearest quantized to this type (`keep-R-TYPE.gguf`).
    #[arg(long)]
    pub r#type: Option<QuantType>,
    /// Shuffling seed of the calibration passages.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl PruneArgs {
    /// The job these flags describe.
    fn job(&self, data_dir: &Path) -> PruneJob {
        PruneJob {
            method: self.method,
            keeps: self.keep.clone(),
            masks: MaskConfig {
                steps: self.steps,
                batch: self.batch,
                lr: self.mask_lr,
                ..MaskConfig::default()
            },
            recover: RecoverConfig {
                steps: self.recover_steps,
                batch: self.batch,
                lr: self.recover_lr,
                lora_rank: self.recover_rank,
                ..RecoverConfig::default()
            },
            calibration: CalibrationText::new(
                &self.calib,
                data_dir,
                self.calib_rows,
                self.seq_len,
                self.seed,
            ),
            out: self.out.clone(),
        }
    }
}

/// Runs `geek compress prune`.
pub fn run(args: PruneArgs, config: &Resolved) -> Result<()> {
    let path = config.model_path(args.input.as_deref())?;
    let started = Instant::now();
    let base = BaseWeights::load(&path)?;
    let job = args.job(&config.data_dir);
    let mask_steps = match job.method {
        PruneMethod::Learned => job.masks.steps,
        PruneMethod::Magnitude => 0,
    };
    let total = mask_steps + job.keeps.len() * job.recover.steps;
    let bar = crate::progress::steps_bar(total as u64);
    let engine = tokenizer(config, &path)?;
    let mut offset = 0u64;
    let result = pipeline::prune(&base, &job, &engine, &mut |e| match e {
        PipelineEvent::Stage(stage) => bar.set_message(stage),
        PipelineEvent::Prune(e) => show(&bar, e, 0, &mut offset, &job),
        _ => {}
    });
    bar.finish_and_clear();
    let sizes = result?;
    for size in &sizes {
        print_size(size, args.r#type)?;
    }
    println!(
        "{} size(s) from {} in {:.0} s; serve one: geek ask --model {} \"…\"",
        sizes.len(),
        path.display(),
        started.elapsed().as_secs_f64(),
        sizes
            .first()
            .map_or(PathBuf::new(), |s| s.path.clone())
            .display()
    );
    Ok(())
}

/// Prints what one size kept, and quantizes it when asked.
fn print_size(size: &PrunedSize, ty: Option<QuantType>) -> Result<()> {
    let (k, f) = (&size.kept, &size.full);
    let ratio = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    let heads: usize = size.plan.heads.iter().map(Vec::len).sum();
    println!(
        "keep {}: {} -> {} parameters ({:.1}% of non-embedding: attention {:.1}%, MLP {:.1}%, \
         hidden {}); {heads} query heads, MLP widths {}..{}; held-out KL {:.4} -> {:.4} after \
         recovery; {} ({:.1} MB)",
        size.keep,
        f.total(),
        k.total(),
        ratio(k.non_embedding(), f.non_embedding()),
        ratio(k.attention, f.attention),
        ratio(k.mlp, f.mlp),
        size.plan.hidden.len(),
        size.plan.ffn.iter().map(Vec::len).min().unwrap_or(0),
        size.plan.ffn.iter().map(Vec::len).max().unwrap_or(0),
        size.recovered.initial_kl,
        size.recovered.final_kl,
        size.path.display(),
        std::fs::metadata(&size.path).map_or(0, |m| m.len()) as f64 / 1e6,
    );
    if let Some(ty) = ty {
        let out = size
            .path
            .with_file_name(format!("keep-{}-{}.gguf", size.keep, ty.name()));
        let model = BaseWeights::load(&size.path)?;
        let report = quantize_rtn(&model, ty, &out)?;
        println!(
            "  {}: {:.2} bits/weight, {:.1} MB",
            out.display(),
            report.bits_per_weight,
            std::fs::metadata(&out).map_or(0, |m| m.len()) as f64 / 1e6
        );
    }
    Ok(())
}

/// Moves the bar for one pruning event: mask steps from `base`, then the recovery steps of one
/// size after another (`offset` keeps where the current size's start).
pub(super) fn show(bar: &ProgressBar, e: &PruneEvent, base: u64, offset: &mut u64, job: &PruneJob) {
    let mask_steps = match job.method {
        PruneMethod::Learned => job.masks.steps as u64,
        PruneMethod::Magnitude => 0,
    };
    match e {
        PruneEvent::MasksStarted {
            masks,
            rows,
            start_step,
        } => {
            crate::progress::note(
                bar,
                format!(
                    "{masks} masks; {rows} calibration rows{}",
                    super::resuming_note(*start_step)
                ),
            );
            bar.set_position(base + *start_step as u64);
        }
        PruneEvent::MaskStep {
            step,
            kl,
            lambda,
            kept,
            tokens_per_sec,
        } => {
            bar.set_position(base + *step as u64);
            bar.set_message(format!(
                "masks: KL {kl:.4} λ {lambda:.2e} keeps {:.1}% {tokens_per_sec:.0} tok/s",
                100.0 * kept
            ));
            tracing::info!(step, kl, lambda, kept, tokens_per_sec, "mask step");
            if bar.is_hidden() && (*step == 1 || step % 10 == 0) {
                eprintln!("mask step {step}: KL {kl:.4}, λ {lambda:.3e}, keeps {kept:.3}, {tokens_per_sec:.0} tokens/s");
            }
        }
        PruneEvent::MaskHeldout { step, kl } => {
            crate::progress::note(bar, format!("mask step {step}: held-out KL {kl:.4}"))
        }
        PruneEvent::Extracted { keep, kept, full } => {
            *offset = base
                + mask_steps
                + job.keeps.iter().position(|k| k == keep).unwrap_or(0) as u64
                    * job.recover.steps as u64;
            crate::progress::note(
                bar,
                format!(
                    "keep {keep}: {} of {} non-embedding parameters",
                    kept.non_embedding(),
                    full.non_embedding()
                ),
            );
        }
        PruneEvent::RecoverStarted {
            weights,
            heldout_kl,
            start_step,
        } => {
            crate::progress::note(
                bar,
                format!(
                    "recovering {weights} weights; held-out KL {heldout_kl:.4}{}",
                    super::resuming_note(*start_step)
                ),
            );
            bar.set_position(*offset + *start_step as u64);
        }
        PruneEvent::RecoverStep {
            step,
            kl,
            tokens_per_sec,
        } => {
            bar.set_position(*offset + *step as u64);
            bar.set_message(format!("recover: KL {kl:.4} {tokens_per_sec:.0} tok/s"));
            tracing::info!(step, kl, tokens_per_sec, "recovery step");
            if bar.is_hidden() && (*step == 1 || step % 10 == 0) {
                eprintln!("recovery step {step}: KL {kl:.4}, {tokens_per_sec:.0} tokens/s");
            }
        }
        PruneEvent::RecoverHeldout { step, kl } => {
            crate::progress::note(bar, format!("recovery step {step}: held-out KL {kl:.4}"))
        }
    }
}
