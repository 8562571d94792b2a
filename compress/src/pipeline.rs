//! The commands' work, as functions: finetune an adapter on a JSONL file, quantize a model
//! (round-to-nearest or learned scales on calibration text), prune it into smaller sizes
//! ([`prune()`]), and finetune → merge → quantize in one go. Progress comes out as
//! [`PipelineEvent`]s; the caller draws it.
//!
//! Text is tokenized by the llama.cpp backend (a [`geek_backend::Engine`] on the same model),
//! so training sees the tokens serving will.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use geek_backend::Engine;
use serde::{Deserialize, Serialize};

pub use crate::calibration::CalibrationText;
use crate::checkpoint::{read_json, write_json};
use crate::data::{read_jsonl, tokenize, Tokenized};
use crate::distill::{learn, LearnEvent, LearnSummary, LearnedConfig};
use crate::export::{merge, merged_tensor_names};
use crate::prune::{
    extract, learn_masks, recover, MaskConfig, ParameterCount, Plan, PruneEvent, RecoverConfig,
    Recovered, Scores,
};
use crate::quantize::{quantize_rtn, quantize_rtn_onto, Mix, QuantReport, QuantType};
use crate::train::{finetune as train, TrainConfig, TrainEvent, TrainSummary};
use crate::{AdaptedModel, AdapterConfig, AdapterKind, BaseWeights, Error, Result};

/// How weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    /// ggml's round-to-nearest (what llama-quantize does).
    Rtn,
    /// Scales learned by distillation from the unquantized model (QuantGPT).
    Learned,
}

impl std::fmt::Display for QuantMethod {
    /// The name the command line takes (`rtn`, `learned`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantMethod::Rtn => "rtn",
            QuantMethod::Learned => "learned",
        })
    }
}

impl std::str::FromStr for QuantMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rtn" => Ok(QuantMethod::Rtn),
            "learned" => Ok(QuantMethod::Learned),
            other => Err(Error::Config(format!(
                "unknown method `{other}` (rtn or learned)"
            ))),
        }
    }
}

/// What quantization makes.
#[derive(Debug, Clone)]
pub struct QuantizeJob {
    /// The type of the linear weights.
    pub ty: QuantType,
    /// rtn or learned.
    pub method: QuantMethod,
    /// The learned method's settings (its `ty` is overridden by [`QuantizeJob::ty`]; its
    /// `embedding` applies to both methods).
    pub learned: LearnedConfig,
    /// Calibration text of the learned method.
    pub calibration: CalibrationText,
    /// The GGUF written.
    pub out: PathBuf,
    /// llama-quantize's mix of the type (see [`Mix::medium`]; learned: its q5_k / q6_k
    /// layers by rtn).
    pub medium: bool,
}

impl QuantizeJob {
    /// The type of each tensor this job writes.
    pub fn mix(&self) -> Mix {
        Mix {
            ty: self.ty,
            embedding: self.learned.embedding,
            medium: self.medium,
        }
    }
}

/// Progress of the work, for the caller to show.
#[derive(Debug)]
pub enum PipelineEvent<'a> {
    /// A stage starts (`tokenizing calibration text`, `merging the adapter`, …).
    Stage(&'static str),
    /// The finetune's progress.
    Finetune(&'a TrainEvent),
    /// The learned quantization's progress.
    Quantize(&'a LearnEvent),
    /// Pruning's progress.
    Prune(&'a PruneEvent),
}

/// Quantizes `base` as `job` says; returns what was written and, for the learned method,
/// the distillation's summary. A learned run checkpoints beside its output (`OUT.ckpt`) and
/// a rerun of the same job resumes from there.
pub fn quantize(
    base: &BaseWeights,
    job: &QuantizeJob,
    tokenizer: &Engine,
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<(QuantReport, Option<LearnSummary>)> {
    if job.method == QuantMethod::Rtn {
        return Ok((quantize_rtn(base, job.mix(), &job.out)?, None));
    }
    events(PipelineEvent::Stage("tokenizing calibration text"));
    let rows = job.calibration.rows(tokenizer)?;
    let config = LearnedConfig {
        ty: job.ty,
        medium: job.medium,
        ..job.learned.clone()
    };
    let checkpoint = job.out.with_extension("ckpt");
    let (model, summary) = learn(base, &rows, &config, Some(&checkpoint), &mut |e| {
        events(PipelineEvent::Quantize(e))
    })?;
    let report = model.write_gguf(base, &job.out)?;
    let _ = std::fs::remove_dir_all(&checkpoint);
    Ok((report, Some(summary)))
}

/// An adapter finetune.
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// The adapter.
    pub adapter: AdapterConfig,
    /// The optimisation.
    pub train: TrainConfig,
    /// `{prompt, completion}` JSONL.
    pub data: PathBuf,
    /// Only the file's first N examples.
    pub limit: Option<usize>,
    /// Checkpoint (resumed when present), adapter, loss curve and summary go here.
    pub out: PathBuf,
}

/// Trains the adapter of `job` on `base` (read from `base_path`); `tokenizer` tokenizes the
/// examples.
pub fn finetune(
    base_path: &Path,
    job: &FinetuneJob,
    tokenizer: &Engine,
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<(BaseWeights, AdaptedModel, TrainSummary)> {
    let data = finetune_data(job, tokenizer, events)?;
    finetune_tokenized(base_path, job, &data, events)
}

/// The finetune's examples read and tokenized (the first half of [`finetune`]: a caller that
/// holds the tokenizer only for this can drop it before the weights are loaded).
pub fn finetune_data(
    job: &FinetuneJob,
    tokenizer: &Engine,
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<Vec<Tokenized>> {
    job.adapter.validate()?;
    let mut examples = read_jsonl(&job.data)?;
    if let Some(n) = job.limit {
        examples.truncate(n);
    }
    events(PipelineEvent::Stage("tokenizing the training data"));
    tokenize(tokenizer, &examples)
}

/// The finetune on examples [`finetune_data`] tokenized: the base loaded, the adapter trained.
pub fn finetune_tokenized(
    base_path: &Path,
    job: &FinetuneJob,
    data: &[Tokenized],
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<(BaseWeights, AdaptedModel, TrainSummary)> {
    let base = BaseWeights::load(base_path)?;
    let (model, summary) = train(&base, &job.adapter, data, &job.train, &job.out, &mut |e| {
        events(PipelineEvent::Finetune(e))
    })?;
    Ok((base, model, summary))
}

/// [finetune → merge] → [prune] → quantize.
#[derive(Debug, Clone)]
pub struct PipelineJob {
    /// The finetune whose adapter is merged first (its `out` is the work directory), if any.
    pub finetune: Option<FinetuneJob>,
    /// Pruning to one size before quantization, if any (its `keeps` holds that one ratio).
    pub prune: Option<PruneJob>,
    /// The quantization of the result.
    pub quantize: QuantizeJob,
    /// After a finetune, quantize only the tensors the adapter changed (by rtn, to the
    /// quantization's type) and copy every other tensor from the base file as it is (see
    /// [`quantize_rtn_onto`]); needs a finetune and rtn, and no pruning.
    pub keep_base: bool,
}

impl PipelineJob {
    /// Refuses, before any work, the stages that cannot go together (and a mix the
    /// quantization has no rules for, which would otherwise be found after the finetune).
    fn check(&self) -> Result<()> {
        self.quantize.mix().check()?;
        if let Some(f) = &self.finetune {
            if f.adapter.kind == AdapterKind::LorettaAdp {
                return Err(Error::NotExportable(
                    "loretta-adp adds layers the GGUF model has no place for: pick lora, moslora or loretta-rep"
                        .into(),
                ));
            }
        }
        if self.keep_base {
            let why = if self.finetune.is_none() {
                Some("there is no finetune whose changed tensors it would quantize")
            } else if self.prune.is_some() {
                Some("pruning changes every tensor's shape")
            } else if self.quantize.method != QuantMethod::Rtn {
                Some("it quantizes the changed tensors by rtn: give --method rtn")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::Config(format!("--keep-base: {why}")));
            }
        }
        Ok(())
    }
}

/// What the pipeline made.
#[derive(Debug)]
pub struct PipelineOutcome {
    /// The finetune's summary.
    pub train: Option<TrainSummary>,
    /// The pruned size.
    pub pruned: Option<PrunedSize>,
    /// The weights that were quantized.
    pub quantized: BaseWeights,
    /// The quantized file.
    pub report: QuantReport,
    /// The learned quantization's summary.
    pub learn: Option<LearnSummary>,
}

/// Finetunes and merges an adapter, prunes, and quantizes the result into one GGUF — each
/// stage when `job` has it. `finetuned` sees the trained adapter (to save it) before it is
/// merged and freed.
pub fn pipeline(
    base_path: &Path,
    job: &PipelineJob,
    tokenizer: &Engine,
    finetuned: &mut dyn FnMut(&BaseWeights, &AdaptedModel, &TrainSummary) -> Result<()>,
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<PipelineOutcome> {
    job.check()?;
    let (mut weights, train, changed) = match &job.finetune {
        Some(finetune_job) => {
            let (base, model, train) = finetune(base_path, finetune_job, tokenizer, events)?;
            finetuned(&base, &model, &train)?;
            events(PipelineEvent::Stage("merging the adapter"));
            let changed: BTreeSet<String> = merged_tensor_names(&model).into_iter().collect();
            (merge(&model, &base)?, Some(train), changed)
        }
        None => (BaseWeights::load(base_path)?, None, BTreeSet::new()),
    };
    let pruned = match &job.prune {
        Some(prune_job) => {
            let size = prune(&weights, prune_job, tokenizer, events)?
                .pop()
                .ok_or_else(|| Error::Config("pruning made no model".into()))?;
            weights = BaseWeights::load(&size.path)?;
            Some(size)
        }
        None => None,
    };
    let (report, learn) = if job.keep_base {
        events(PipelineEvent::Stage("quantizing the changed tensors"));
        let report = quantize_rtn_onto(&weights, &changed, job.quantize.mix(), &job.quantize.out)?;
        (report, None)
    } else {
        quantize(&weights, &job.quantize, tokenizer, events)?
    };
    Ok(PipelineOutcome {
        train,
        pruned,
        quantized: weights,
        report,
        learn,
    })
}

/// How the structures to prune are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneMethod {
    /// SIMPLE's learned masks, one global threshold per size.
    Learned,
    /// The L2 norm of each structure's weights, the same fraction of every component.
    Magnitude,
}

impl std::str::FromStr for PruneMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "learned" => Ok(PruneMethod::Learned),
            "magnitude" => Ok(PruneMethod::Magnitude),
            other => Err(Error::Config(format!(
                "unknown pruning method `{other}` (learned or magnitude)"
            ))),
        }
    }
}

/// Structured pruning of a model into one or more sizes.
#[derive(Debug, Clone, Serialize)]
pub struct PruneJob {
    /// learned masks or magnitude.
    pub method: PruneMethod,
    /// Fractions of the non-embedding parameters to keep, one model each.
    pub keeps: Vec<f64>,
    /// Mask learning (learned method; its `target` is replaced by the smallest keep).
    pub masks: MaskConfig,
    /// Recovery of each size.
    pub recover: RecoverConfig,
    /// Calibration text of mask learning and recovery.
    #[serde(skip)]
    pub calibration: CalibrationText,
    /// The directory written: `masks.json`, `keep-R.gguf` (f32) and `keep-R.json` per size,
    /// checkpoints while running.
    #[serde(skip)]
    pub out: PathBuf,
}

/// One pruned size, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrunedSize {
    /// The keep ratio asked.
    pub keep: f64,
    /// Parameters kept, by component.
    pub kept: ParameterCount,
    /// Parameters of the original, by component.
    pub full: ParameterCount,
    /// Query heads, key/value heads and MLP width per layer, and the hidden width.
    pub plan: Plan,
    /// Held-out KL(original ‖ pruned) before and after recovery.
    pub recovered: Recovered,
    /// The f32 GGUF.
    pub path: PathBuf,
    /// The job's settings (a rerun with others is refused, not mixed in).
    pub settings: serde_json::Value,
}

/// Prunes `base` as `job` says, writing each size into `job.out`. A rerun resumes: learned
/// masks and finished sizes are read back, unfinished ones continue from their checkpoints.
pub fn prune(
    base: &BaseWeights,
    job: &PruneJob,
    tokenizer: &Engine,
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<Vec<PrunedSize>> {
    crate::prune::check_prunable(base)?;
    if job.keeps.is_empty() || job.keeps.iter().any(|k| !(*k > 0.0 && *k <= 1.0)) {
        return Err(Error::Config("keep ratios must lie in (0, 1]".into()));
    }
    std::fs::create_dir_all(&job.out).map_err(Error::io(&job.out))?;
    // What a size depends on: the method, the masks (their target is the smallest keep) and
    // the recovery — not which other sizes are asked for.
    let masks = MaskConfig {
        target: job.keeps.iter().copied().fold(1.0, f64::min),
        ..job.masks.clone()
    };
    let settings = serde_json::json!({
        "method": job.method,
        "masks": (job.method == PruneMethod::Learned).then_some(&masks),
        "recover": job.recover,
        "calibration": [job.calibration.rows, job.calibration.seq_len, job.calibration.seed],
        "base": base.path,
    });
    events(PipelineEvent::Stage("tokenizing calibration text"));
    let rows = job.calibration.rows(tokenizer)?;
    let scores = match job.method {
        PruneMethod::Magnitude => Scores::magnitude(base)?,
        PruneMethod::Learned => {
            // Masks do not depend on the recovery: a longer recovery reuses them.
            let mut mask_settings = settings.clone();
            mask_settings["recover"] = serde_json::Value::Null;
            masks_of(base, &masks, &job.out, &rows, &mask_settings, events)?
        }
    };
    let full_plan = Plan::full(&base.config);
    let mut sizes = Vec::new();
    for &keep in &job.keeps {
        let name = format!("keep-{keep}");
        let summary_path = job.out.join(format!("{name}.json"));
        if summary_path.is_file() {
            let done: PrunedSize = read_json(&summary_path)?;
            if done.settings != settings {
                return Err(Error::CheckpointMismatch {
                    path: summary_path,
                    message: "written by other pruning settings: choose another --out".into(),
                });
            }
            sizes.push(done);
            continue;
        }
        let (plan, masks) = match job.method {
            PruneMethod::Learned => (Plan::for_keep(&scores, &base.config, keep), Some(&scores)),
            PruneMethod::Magnitude => (Plan::uniform_for_keep(&scores, &base.config, keep), None),
        };
        let pruned = extract(base, &plan, masks)?;
        let (kept, full) = (
            plan.parameters(&base.config),
            full_plan.parameters(&base.config),
        );
        events(PipelineEvent::Prune(&PruneEvent::Extracted {
            keep,
            kept,
            full,
        }));
        let ckpt = job.out.join(format!("{name}.ckpt"));
        let (recovered_model, recovered) =
            recover(base, pruned, &rows, &job.recover, Some(&ckpt), &mut |e| {
                events(PipelineEvent::Prune(e))
            })?;
        let path = job.out.join(format!("{name}.gguf"));
        quantize_rtn(&recovered_model, QuantType::F32, &path)?;
        let size = PrunedSize {
            keep,
            kept,
            full,
            plan,
            recovered,
            path,
            settings: settings.clone(),
        };
        write_json(&summary_path, &size)?;
        let _ = std::fs::remove_dir_all(&ckpt);
        sizes.push(size);
    }
    Ok(sizes)
}

/// The masks `config` learns on `base`: read from `out/masks.json` when a finished run of the
/// same settings left it, else learned (resuming from `out/masks.ckpt`) and saved there.
fn masks_of(
    base: &BaseWeights,
    config: &MaskConfig,
    out: &Path,
    rows: &[Vec<u32>],
    settings: &serde_json::Value,
    events: &mut dyn FnMut(PipelineEvent),
) -> Result<Scores> {
    #[derive(Serialize, Deserialize)]
    struct SavedMasks {
        settings: serde_json::Value,
        scores: Scores,
    }
    let path = out.join("masks.json");
    if path.is_file() {
        let saved: SavedMasks = read_json(&path)?;
        if saved.settings == *settings {
            return Ok(saved.scores);
        }
        return Err(Error::CheckpointMismatch {
            path,
            message: "masks learned with other settings: choose another --out".into(),
        });
    }
    events(PipelineEvent::Stage("learning masks"));
    let ckpt = out.join("masks.ckpt");
    let scores = learn_masks(base, rows, config, Some(&ckpt), &mut |e| {
        events(PipelineEvent::Prune(e))
    })?;
    let saved = SavedMasks {
        settings: settings.clone(),
        scores,
    };
    write_json(&path, &saved)?;
    let _ = std::fs::remove_dir_all(&ckpt);
    Ok(saved.scores)
}
