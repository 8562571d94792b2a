//! Structured pruning with learnable masks (SIMPLE: Tao et al., Findings of ACL 2023).
//!
//! Three kinds of structure are prunable: each layer's attention heads, each layer's MLP
//! channels, and the hidden dimensions every layer shares (where generative models keep
//! persistent outliers). Pruning runs in three stages:
//!
//! 1. **Sparse mask learning** ([`learn_masks`]): one real-valued mask per structure,
//!    initialised to 1 and multiplied into the forward pass ([`crate::model::StructureMasks`]),
//!    is trained with the base weights frozen on knowledge distillation from the unpruned
//!    model (KL of the next-token distributions) plus an L1 sparsity penalty weighted by the
//!    parameters each structure costs. The penalty's weight λ follows a controller: it grows
//!    while the model the masks would give at |m| ≥ ½ is larger than the size aimed at, and
//!    shrinks once it is smaller; the aim falls linearly from the whole model to the target
//!    over the first half of the steps, so the run settles at the target size. (The paper's relaxation — real
//!    masks with L1, thresholded afterwards — rather than hard-concrete L0 gates.)
//! 2. **Extraction** ([`Plan::for_keep`], [`extract()`]): one threshold on |m| per size, found
//!    by bisection so the non-embedding parameters kept are at most the ratio asked; widths
//!    rounded to multiples of 32 (so block-quantized types apply), heads to whole key/value
//!    groups; the mask values folded into the kept weights. One mask run gives every size.
//! 3. **Recovery** ([`recover`]): the kept linear weights fine-tuned by distillation from the
//!    unpruned model (the embedding and norms stay as extracted).
//!
//! The baseline ([`Scores::magnitude`], [`Plan::uniform_for_keep`]) keeps the same fraction of
//! every component by the L2 norm of each structure's weights, and gets the same recovery.
//!
//! Pruned models are written as llama.cpp's `deci` architecture: llama's layers with a query
//! head count, key/value head count and MLP width per layer, which llama's own loader cannot
//! take. A qwen2 model keeps its q/k/v biases there, and its query and key rows are reordered
//! for deci's interleaved RoPE (see [`extract`]).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, load_run, read_json, save_run};
use crate::distill::{batch_of, check_rows, mean_kl, rows_fingerprint, teacher_view};
use crate::fused::soft_cross_entropy;
use crate::model::StructureMasks;
use crate::optim::{self, grads_of, AdamW, Cadence, NamedVars, Trainer};
use crate::{AdaptedModel, BaseWeights, Error, Result};

mod extract;
mod plan;
mod recover;

pub use extract::extract;
pub use plan::{ParameterCount, Plan, Scores, WIDTH_STEP};
pub use recover::{recover, RecoverConfig, Recovered};

/// How the masks are learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskConfig {
    /// The size the sparsity penalty drives toward, as a fraction of the non-embedding
    /// parameters (the smallest size to be extracted).
    pub target: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Calibration rows per step.
    pub batch: usize,
    /// Learning rate of the masks (AdamW, constant after warm-up).
    pub lr: f64,
    /// Warm-up steps of the learning rate.
    pub warmup: usize,
    /// First weight λ of the sparsity penalty.
    pub sparsity: f64,
    /// Largest factor by which the controller moves λ in one step (taken in full when the
    /// size is 5 points or more off its aim, in proportion below).
    pub lambda_step: f64,
    /// Share of the steps over which the size aimed at falls linearly from the whole model to
    /// `target` (a target reached at once overshoots: the masks lag λ by tens of steps).
    pub anneal: f64,
    /// Calibration rows held out to measure KL(teacher ‖ masked model).
    pub holdout: usize,
    /// Save a resumable checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Measure held-out KL every this many steps (and after the last).
    pub eval_every: usize,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            target: 0.5,
            steps: 100,
            batch: 4,
            lr: 5e-2,
            warmup: 5,
            sparsity: 1.0,
            lambda_step: 1.1,
            anneal: 0.5,
            holdout: 4,
            checkpoint_every: 10,
            eval_every: 25,
        }
    }
}

/// Progress of pruning.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PruneEvent {
    /// A size was cut out of the model.
    Extracted {
        /// The keep ratio asked.
        keep: f64,
        /// Parameters of the pruned model.
        kept: ParameterCount,
        /// Parameters of the original.
        full: ParameterCount,
    },
    /// Mask learning starts (or resumes at `start_step`).
    MasksStarted {
        /// Masks in all.
        masks: usize,
        /// Calibration rows trained on.
        rows: usize,
        /// The step a checkpoint resumed at.
        start_step: usize,
    },
    /// One mask step done.
    MaskStep {
        /// 1-based step.
        step: usize,
        /// KL(teacher ‖ masked model) on the batch, nats per token.
        kl: f64,
        /// λ after this step.
        lambda: f64,
        /// Non-embedding fraction the masks keep at |m| ≥ ½.
        kept: f64,
        /// Calibration tokens per second.
        tokens_per_sec: f64,
    },
    /// Held-out KL of the masked model.
    MaskHeldout {
        /// After this many steps.
        step: usize,
        /// Nats per token.
        kl: f64,
    },
    /// Recovery of one size starts (or resumes).
    RecoverStarted {
        /// Weights trained.
        weights: usize,
        /// Held-out KL of the extracted model before recovery.
        heldout_kl: f64,
        /// The step a checkpoint resumed at.
        start_step: usize,
    },
    /// One recovery step done.
    RecoverStep {
        /// 1-based step.
        step: usize,
        /// KL(teacher ‖ pruned model) on the batch.
        kl: f64,
        /// Calibration tokens per second.
        tokens_per_sec: f64,
    },
    /// Held-out KL of the pruned model during recovery.
    RecoverHeldout {
        /// After this many steps.
        step: usize,
        /// Nats per token.
        kl: f64,
    },
}

/// The learnable masks of a model, one variable per layer and kind.
struct MaskVars {
    heads: Vec<Var>,
    ffn: Vec<Var>,
    hidden: Var,
}

impl MaskVars {
    fn ones(config: &crate::LlamaConfig) -> Result<MaskVars> {
        let ones = |n: usize| Var::ones(n, candle_core::DType::F32, &Device::Cpu);
        Ok(MaskVars {
            heads: (0..config.n_layer)
                .map(|_| ones(config.n_head))
                .collect::<candle_core::Result<_>>()?,
            ffn: (0..config.n_layer)
                .map(|_| ones(config.n_ff))
                .collect::<candle_core::Result<_>>()?,
            hidden: ones(config.n_embd)?,
        })
    }

    fn named(&self) -> NamedVars {
        let mut out: NamedVars = Vec::new();
        for (i, v) in self.heads.iter().enumerate() {
            out.push((format!("heads.{i}"), v.clone()));
        }
        for (i, v) in self.ffn.iter().enumerate() {
            out.push((format!("ffn.{i}"), v.clone()));
        }
        out.push(("hidden".into(), self.hidden.clone()));
        out
    }

    /// The hidden mask as used: the variable divided by its root mean square. RMS norms make
    /// the model blind to a common scale of the residual stream, so an unnormalised hidden
    /// mask could shrink as a whole at no cost to the distillation loss while the L1 penalty
    /// drove it toward 0 (measured: the whole mask fell below ½ in 20 steps, then ε took over
    /// and the KL grew). Normalised, only the pattern across dimensions is learned.
    fn hidden(&self) -> Result<Tensor> {
        let m = self.hidden.as_tensor();
        let rms = (m.sqr()?.mean_all()? + 1e-12)?.sqrt()?;
        Ok(m.broadcast_div(&rms)?)
    }

    fn masks(&self) -> Result<StructureMasks> {
        Ok(StructureMasks {
            heads: self.heads.iter().map(|v| v.as_tensor().clone()).collect(),
            ffn: self.ffn.iter().map(|v| v.as_tensor().clone()).collect(),
            hidden: self.hidden()?,
        })
    }

    fn scores(&self) -> Result<Scores> {
        let values = |vars: &[Var]| -> Result<Vec<Vec<f32>>> {
            vars.iter()
                .map(|v| Ok(v.as_tensor().to_vec1::<f32>()?))
                .collect()
        };
        Ok(Scores {
            heads: values(&self.heads)?,
            ffn: values(&self.ffn)?,
            hidden: self.hidden()?.to_vec1()?,
        })
    }

    /// Σ cost·|m| / non-embedding parameters: the share of the model the masks hold, each
    /// structure weighted by the parameters it costs.
    fn penalty(&self, config: &crate::LlamaConfig) -> Result<Tensor> {
        let (e, hd) = (config.n_embd as f64, config.head_dim() as f64);
        let rep = (config.n_head / config.n_head_kv.max(1)) as f64;
        let full = Plan::full(config).parameters(config).non_embedding() as f64;
        let head_cost = 2.0 * hd * e * (1.0 + 1.0 / rep);
        let channel_cost = 3.0 * e;
        let dim_cost = full / e;
        let l1 = |vars: &[Var]| -> Result<Tensor> {
            let sums = vars
                .iter()
                .map(|v| v.as_tensor().abs()?.sum_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&sums, 0)?.sum_all()?)
        };
        let total = ((l1(&self.heads)? * head_cost)?
            + (l1(&self.ffn)? * channel_cost)?
            + (self.hidden()?.abs()?.sum_all()? * dim_cost)?)?;
        Ok((total / full)?)
    }
}

/// What a mask checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct MaskState {
    step: usize,
    lambda: f64,
    config: MaskConfig,
    base: String,
    data: String,
}

/// Learns a mask per head, MLP channel and hidden dimension of `base` on calibration `rows`
/// (token rows of one length; the last `config.holdout` held out). With `checkpoint`, the run
/// saves its state there and resumes from it when rerun on the same model, data and settings.
pub fn learn_masks(
    base: &BaseWeights,
    rows: &[Vec<u32>],
    config: &MaskConfig,
    checkpoint: Option<&Path>,
    on_event: &mut dyn FnMut(&PruneEvent),
) -> Result<Scores> {
    if config.batch == 0 || !(0.0..=1.0).contains(&config.target) || config.lambda_step < 1.0 {
        return Err(Error::Config(
            "masks need a batch ≥ 1, a target in [0, 1] and a λ step ≥ 1".into(),
        ));
    }
    check_rows(rows, config.holdout)?;
    check_prunable(base)?;
    let teacher = AdaptedModel::new(base, None)?;
    let vars = MaskVars::ones(&base.config)?;
    let (train, heldout) = rows.split_at(rows.len() - config.holdout);
    let mut run = MaskRun {
        t: Training {
            teacher: &teacher,
            named: vars.named(),
            opt: AdamW::new(),
            train,
            heldout,
            checkpoint,
            on_event,
        },
        base,
        vars: &vars,
        config,
        state: MaskState {
            step: 0,
            lambda: config.sparsity,
            config: config.clone(),
            base: base.path.display().to_string(),
            data: rows_fingerprint(rows),
        },
    };
    if let Some(dir) = checkpoint {
        if checkpoint::exists(dir)? {
            run.restore(dir)?;
        }
    }
    let start = run.state.step;
    (run.t.on_event)(&PruneEvent::MasksStarted {
        masks: run.t.named.iter().map(|(_, v)| v.elem_count()).sum(),
        rows: train.len(),
        start_step: start,
    });
    let cadence = Cadence::of_run(
        config.steps,
        config.eval_every,
        config.checkpoint_every,
        checkpoint.is_some(),
    );
    optim::run(&mut run, start, cadence)?;
    vars.scores()
}

/// Pruning reads llama and qwen2 models: one head count and width for every layer (the
/// masks' shape), not an already pruned (deci) one.
pub fn check_prunable(base: &BaseWeights) -> Result<()> {
    if base.config.architecture == crate::Architecture::Deci {
        return Err(Error::Config(format!(
            "pruning reads llama and qwen2 models (this one is {}): prune the unpruned model",
            base.config.architecture.name()
        )));
    }
    Ok(())
}

/// The `batch` training rows of `step`, cycling through `train`.
fn rows_of_step(train: &[Vec<u32>], step: usize, batch: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|i| train[(step * batch + i) % train.len()].clone())
        .collect()
}

/// A mask-learning run in progress.
struct MaskRun<'a> {
    t: Training<'a>,
    base: &'a BaseWeights,
    vars: &'a MaskVars,
    config: &'a MaskConfig,
    state: MaskState,
}

/// What both trainings of pruning hold: the unpruned teacher, the trained variables and their
/// optimizer, the calibration rows (trained on, held out), where checkpoints go and who hears
/// of progress.
struct Training<'a> {
    teacher: &'a AdaptedModel,
    named: NamedVars,
    opt: AdamW,
    train: &'a [Vec<u32>],
    heldout: &'a [Vec<u32>],
    checkpoint: Option<&'a Path>,
    on_event: &'a mut dyn FnMut(&PruneEvent),
}

impl MaskRun<'_> {
    fn restore(&mut self, dir: &Path) -> Result<()> {
        let saved: MaskState = read_json(&dir.join("state.json"))?;
        // More steps, or another cadence, continue the same run.
        let settings = |c: &MaskConfig| MaskConfig {
            steps: 0,
            checkpoint_every: 0,
            eval_every: 0,
            ..c.clone()
        };
        if settings(&saved.config) != settings(self.config)
            || (&saved.base, &saved.data) != (&self.state.base, &self.state.data)
        {
            return Err(Error::CheckpointMismatch {
                path: dir.to_path_buf(),
                message: "another model, calibration text or mask settings".into(),
            });
        }
        load_run(dir, &self.t.named, &mut self.t.opt, saved.step)?;
        self.state.step = saved.step;
        self.state.lambda = saved.lambda;
        Ok(())
    }

    /// The size the penalty aims at after `done` steps: from the whole model down to the
    /// target over the first `anneal` of the steps, then the target.
    fn aim(&self, done: usize) -> f64 {
        let span = (self.config.anneal * self.config.steps as f64).max(1.0);
        let progress = (done as f64 / span).min(1.0);
        1.0 - (1.0 - self.config.target) * progress
    }

    /// The non-embedding fraction the current masks keep at |m| ≥ ½.
    fn kept(&self) -> Result<f64> {
        let c = &self.base.config;
        let plan = Plan::by_threshold(&self.vars.scores()?, c, 0.5);
        let full = Plan::full(c).parameters(c).non_embedding() as f64;
        Ok(plan.parameters(c).non_embedding() as f64 / full)
    }
}

impl Trainer for MaskRun<'_> {
    fn step(&mut self, step: usize) -> Result<()> {
        let t0 = Instant::now();
        let picked = rows_of_step(self.t.train, step, self.config.batch);
        let batch = batch_of(&picked)?;
        let view = teacher_view(self.t.teacher, &batch)?;
        let student = self.t.teacher.with_masks(self.vars.masks()?);
        let h = student.hidden(&batch)?;
        let (b, t, e) = h.dims3()?;
        let kd = soft_cross_entropy(&student.logits(&h.reshape((b * t, e))?)?, &view.probs)?;
        let penalty = self.vars.penalty(&self.base.config)?;
        let loss = (&kd + (&penalty * self.state.lambda)?)?;
        let grads = loss.backward()?;
        let warm = ((step + 1) as f64 / self.config.warmup.max(1) as f64).min(1.0);
        self.t.opt.step(
            &self.t.named,
            &grads_of(&grads, &self.t.named),
            self.config.lr * warm,
            0.0,
        )?;
        let kept = self.kept()?;
        let gap = kept - self.aim(step + 1);
        let factor = self.config.lambda_step.powf((gap / 0.05).clamp(-1.0, 1.0));
        self.state.lambda = (self.state.lambda * factor).clamp(1e-6, 1e6);
        self.state.step = step + 1;
        (self.t.on_event)(&PruneEvent::MaskStep {
            step: step + 1,
            kl: kd.to_scalar::<f32>()? as f64 - view.entropy,
            lambda: self.state.lambda,
            kept,
            tokens_per_sec: (b * t) as f64 / t0.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn evaluate(&mut self, done: usize) -> Result<()> {
        let student = self.t.teacher.with_masks(self.vars.masks()?);
        let kl = mean_kl(&student, self.t.teacher, self.t.heldout, self.config.batch)?;
        (self.t.on_event)(&PruneEvent::MaskHeldout { step: done, kl });
        Ok(())
    }

    fn checkpoint(&mut self, done: usize) -> Result<()> {
        self.t.save(&MaskState {
            step: done,
            ..self.state.clone()
        })
    }
}

impl Training<'_> {
    /// Saves `state`, the variables and the optimizer into the checkpoint directory, if any.
    fn save(&self, state: &impl Serialize) -> Result<()> {
        match self.checkpoint {
            Some(dir) => save_run(dir, state, &self.named, &self.opt),
            None => Ok(()),
        }
    }
}
