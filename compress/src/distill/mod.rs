//! Learned quantization: QuantGPT's module-wise dynamic scaling trained by distillation.
//!
//! The student is the teacher's transformer with every linear weight fake-quantized
//! ([`crate::blocks`]) and the token embedding quantized once by round-to-nearest. Its
//! scales (and, in QAT mode, its weights) are trained on calibration text to match the
//! full-precision teacher with two losses (Tao et al., ACL 2022):
//!
//! - **logit distillation**: cross-entropy of the student's next-token distribution against
//!   the teacher's, at every position;
//! - **token-level contrastive distillation**: each student token representation (final
//!   hidden state, L2-normalised) is pulled to the teacher's representation of the same token
//!   and pushed from the teacher's representations of the other tokens of the batch and of a
//!   memory bank of earlier batches, with temperature τ.
//!
//! The result is written with [`LearnedModel::write_gguf`] in block types that hold the
//! learned grid exactly, so stock llama.cpp serves what was trained.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::blocks::{BlockFormat, Granularity, QuantGrid, ScaleInit};
use crate::checkpoint::{self, read_json, swap_in, write_json};
use crate::fused::{cross_entropy, soft_cross_entropy};
use crate::importance::Importance;
use crate::optim::{self, fingerprint, grads_of, AdamW, Cadence, NamedVars, Schedule, Trainer};
use crate::quantize::{write_quantized, Mix, QuantReport, QuantType, Quantized};
use crate::{AdaptedModel, BaseWeights, Batch, Error, Result, Target};

mod model;
mod saved;

pub use model::LearnedModel;
pub(crate) use saved::rows_fingerprint;
use saved::{resume, save, snapshot, take_prefixed, Best, CheckpointState};

/// How a learned quantization runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnedConfig {
    /// The type of the linear weights (q8_0, q4_0, q4_1, q5_0, q4_k, q3_k, q2_k).
    pub ty: QuantType,
    /// llama-quantize's mix of the type (Q4_K_M, Q3_K_M, Q2_K; see [`Mix::tensor_type_in`]):
    /// the q5_k / q6_k tensors it picks are quantized by round-to-nearest and kept fixed; the
    /// others learn their scales.
    #[serde(default)]
    pub medium: bool,
    /// Type of the token embedding and output layer, quantized by round-to-nearest and kept
    /// fixed (default: llama-quantize's choice, Q8_0).
    pub embedding: Option<QuantType>,
    /// Who shares a scale factor γ.
    pub granularity: Granularity,
    /// First scales.
    pub init: ScaleInit,
    /// Train the weights too (quantization-aware training), not only the scales.
    pub train_weights: bool,
    /// Optimizer steps (0: the initial scales only).
    pub steps: usize,
    /// Calibration rows per step.
    pub batch: usize,
    /// Peak learning rate of γ and β.
    pub lr: f64,
    /// Peak learning rate of the weights (QAT).
    pub weight_lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Weight λ of the contrastive loss (0 turns it off).
    pub contrastive_weight: f64,
    /// Temperature τ of the contrastive loss.
    pub temperature: f64,
    /// Teacher token representations kept from earlier batches as extra negatives.
    pub memory_bank: usize,
    /// Calibration rows held out to measure KL(teacher ‖ student).
    pub holdout: usize,
    /// Save a resumable checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Measure the held-out KL every this many steps (and after the last); the scales with
    /// the lowest held-out KL, the initial ones included, are the result.
    pub eval_every: usize,
}

impl LearnedConfig {
    /// The per-tensor types.
    pub fn mix(&self) -> Mix {
        Mix {
            ty: self.ty,
            embedding: self.embedding,
            medium: self.medium,
        }
    }
}

impl Default for LearnedConfig {
    fn default() -> Self {
        LearnedConfig {
            ty: QuantType::Q4_0,
            medium: false,
            embedding: None,
            granularity: Granularity::Block,
            init: ScaleInit::Mse,
            train_weights: false,
            steps: 60,
            batch: 4,
            lr: 4e-2,
            weight_lr: 1e-5,
            warmup: 5,
            contrastive_weight: 0.1,
            temperature: 0.1,
            memory_bank: 2048,
            holdout: 4,
            checkpoint_every: 10,
            eval_every: 10,
        }
    }
}

/// Progress of a learned quantization.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum LearnEvent {
    /// The importance of the layers' inputs ([`ScaleInit::Imatrix`]) measured on this many
    /// training rows so far.
    Measuring {
        /// Rows run through the teacher.
        rows: usize,
    },
    /// Scales initialised.
    Started {
        /// Learnable numbers (γ, β, and weights in QAT).
        learnable: usize,
        /// Calibration rows trained on.
        rows: usize,
        /// Held-out KL before training.
        heldout_kl: f64,
        /// The step a checkpoint resumed at (0 for a fresh run).
        start_step: usize,
    },
    /// Held-out KL measured.
    Heldout {
        /// After this many steps.
        step: usize,
        /// KL(teacher ‖ student) per token on the held-out rows.
        kl: f64,
    },
    /// One optimizer step done.
    Step {
        /// 1-based step.
        step: usize,
        /// Logit-distillation KL (teacher ‖ student) on the batch, in nats per token.
        kl: f64,
        /// Contrastive loss on the batch.
        contrastive: f64,
        /// Calibration tokens per second.
        tokens_per_sec: f64,
    },
}

/// What a learned quantization did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LearnSummary {
    /// The configuration.
    pub config: LearnedConfig,
    /// Held-out KL(teacher ‖ student) per token of the round-to-nearest file (ggml's reference
    /// quantizer's blocks, [`ScaleInit::Ggml`]).
    pub rtn_kl: f64,
    /// … with the initial scales.
    pub initial_kl: f64,
    /// … of the result (the best measured).
    pub final_kl: f64,
    /// The step whose scales are the result (0: the initial ones).
    pub best_step: usize,
    /// Seconds spent.
    pub seconds: f64,
}

/// One batch of calibration rows (all of one length, no padding).
pub(crate) fn batch_of(rows: &[Vec<u32>]) -> Result<Batch> {
    let segments: Vec<Vec<usize>> = rows.iter().map(|r| vec![r.len()]).collect();
    Batch::packed(rows, &segments)
}

/// Teacher outputs of a batch: next-token distributions and normalised representations.
pub(crate) struct TeacherView {
    pub(crate) probs: Tensor,
    pub(crate) entropy: f64,
    reps: Tensor,
}

fn normalise(h: &Tensor) -> Result<Tensor> {
    let norm = h.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(h.broadcast_div(&(norm + 1e-6)?)?)
}

pub(crate) fn teacher_view(teacher: &AdaptedModel, batch: &Batch) -> Result<TeacherView> {
    let h = teacher.hidden(batch)?;
    let (b, t, e) = h.dims3()?;
    let h = h.reshape((b * t, e))?;
    let logits = teacher.logits(&h)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?;
    let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
    let entropy = -((&probs * logp)?.sum_all()?.to_scalar::<f32>()? as f64) / (b * t) as f64;
    Ok(TeacherView {
        probs,
        entropy,
        reps: normalise(&h)?,
    })
}

/// Logit-distillation cross-entropy and contrastive loss of the student on a batch.
fn student_losses(
    student: &AdaptedModel,
    batch: &Batch,
    teacher: &TeacherView,
    bank: Option<&Tensor>,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let h = student.hidden(batch)?;
    let (b, t, e) = h.dims3()?;
    let h = h.reshape((b * t, e))?;
    let kd = soft_cross_entropy(&student.logits(&h)?, &teacher.probs)?;
    let keys = match bank {
        Some(bank) => Tensor::cat(&[&teacher.reps, bank], 0)?,
        None => teacher.reps.clone(),
    };
    let sim = (normalise(&h)?.matmul(&keys.t()?)? / temperature)?;
    let targets: Vec<u32> = (0..(b * t) as u32).collect();
    let contrastive = cross_entropy(&sim, &targets)?;
    Ok((kd, contrastive))
}

/// Calibration rows must be of one length ≥ 2, more of them than are held out.
pub(crate) fn check_rows(rows: &[Vec<u32>], holdout: usize) -> Result<()> {
    if rows.len() <= holdout || rows.iter().any(|r| r.len() != rows[0].len() || r.len() < 2) {
        return Err(Error::Config(format!(
            "calibration needs more than {holdout} rows of one length ≥ 2 (got {})",
            rows.len()
        )));
    }
    Ok(())
}

/// Mean KL(teacher ‖ student) per token over `rows`.
fn heldout_kl(
    model: &LearnedModel,
    teacher: &AdaptedModel,
    rows: &[Vec<u32>],
    batch: usize,
) -> Result<f64> {
    mean_kl(&model.student(teacher)?, teacher, rows, batch)
}

/// Mean KL(teacher ‖ student) per token over `rows` (of one length), `batch` rows at a time.
pub(crate) fn mean_kl(
    student: &AdaptedModel,
    teacher: &AdaptedModel,
    rows: &[Vec<u32>],
    batch: usize,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let b = batch_of(chunk)?;
        let view = teacher_view(teacher, &b)?;
        let h = student.hidden(&b)?;
        let (bb, t, e) = h.dims3()?;
        let logits = student.logits(&h.reshape((bb * t, e))?)?.detach();
        let ce = soft_cross_entropy(&logits, &view.probs)?.to_scalar::<f32>()? as f64;
        sum += (ce - view.entropy) * (bb * t) as f64;
        n += bb * t;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// Learns quantization scales of `base` on calibration `rows` (token rows of one length;
/// the last `config.holdout` are held out). With `checkpoint`, the run saves its state there
/// every `config.checkpoint_every` steps and resumes from it when rerun with the same model,
/// data and settings (more steps may be asked for).
pub fn learn(
    base: &BaseWeights,
    rows: &[Vec<u32>],
    config: &LearnedConfig,
    checkpoint: Option<&Path>,
    on_event: &mut dyn FnMut(&LearnEvent),
) -> Result<(LearnedModel, LearnSummary)> {
    let started = Instant::now();
    if config.batch == 0 || config.temperature <= 0.0 {
        return Err(Error::Config(
            "batch and temperature must be positive".into(),
        ));
    }
    check_rows(rows, config.holdout)?;
    let teacher = AdaptedModel::new(base, None)?;
    let heldout = &rows[rows.len() - config.holdout..];
    // Round-to-nearest is what `--method rtn` writes: ggml's reference quantizer's blocks.
    let rtn_kl = if config.init == ScaleInit::Ggml {
        None
    } else {
        let rtn_config = LearnedConfig {
            init: ScaleInit::Ggml,
            ..config.clone()
        };
        let rtn = LearnedModel::new(base, &rtn_config)?;
        Some(heldout_kl(&rtn, &teacher, heldout, config.batch)?)
    };
    let importance = if config.init == ScaleInit::Imatrix {
        let train = &rows[..rows.len() - config.holdout];
        let mut on_batch = |done| on_event(&LearnEvent::Measuring { rows: done });
        Some(Importance::measure(
            &teacher,
            train,
            config.batch,
            &mut on_batch,
        )?)
    } else {
        None
    };
    let model = LearnedModel::with_importance(base, config, importance.as_ref())?;
    drop(importance);
    let initial_kl = heldout_kl(&model, &teacher, heldout, config.batch)?;
    let best = {
        let mut run = LearnRun::start(
            (&model, &teacher),
            base,
            rows,
            config,
            initial_kl,
            checkpoint,
            on_event,
        )?;
        let start = run.start_step;
        optim::run(
            &mut run,
            start,
            Cadence::of_run(
                config.steps,
                config.eval_every,
                config.checkpoint_every,
                checkpoint.is_some(),
            ),
        )?;
        run.best
    };
    if best.step != config.steps {
        for (name, var) in &model.trained_vars() {
            if let Some(t) = best.tensors.get(name) {
                var.set(t)?;
            }
        }
    }
    let summary = LearnSummary {
        config: config.clone(),
        rtn_kl: rtn_kl.unwrap_or(initial_kl),
        initial_kl,
        final_kl: best.kl,
        best_step: best.step,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((model, summary))
}

/// A scale-learning run in progress.
struct LearnRun<'a> {
    model: &'a LearnedModel,
    teacher: &'a AdaptedModel,
    config: &'a LearnedConfig,
    train: &'a [Vec<u32>],
    heldout: &'a [Vec<u32>],
    scales: NamedVars,
    weights: NamedVars,
    trained: NamedVars,
    scale_opt: AdamW,
    weight_opt: AdamW,
    schedules: (Schedule, Schedule),
    /// Teacher representations of recent batches: the contrastive loss's extra negatives.
    bank: VecDeque<Tensor>,
    banked: usize,
    best: Best,
    fresh: CheckpointState,
    checkpoint: Option<&'a Path>,
    start_step: usize,
    on_event: &'a mut dyn FnMut(&LearnEvent),
}

impl<'a> LearnRun<'a> {
    /// Sets the run up (resuming from `checkpoint` when it holds this run) and reports it.
    fn start(
        (model, teacher): (&'a LearnedModel, &'a AdaptedModel),
        base: &BaseWeights,
        rows: &'a [Vec<u32>],
        config: &'a LearnedConfig,
        initial_kl: f64,
        checkpoint: Option<&'a Path>,
        on_event: &'a mut dyn FnMut(&LearnEvent),
    ) -> Result<Self> {
        let (train, heldout) = rows.split_at(rows.len() - config.holdout);
        let (scales, weights) = model.vars();
        let trained = model.trained_vars();
        let schedule = |lr: f64| Schedule {
            lr,
            warmup: config.warmup,
            steps: config.steps,
            min_ratio: crate::train::TrainConfig::default().min_lr_ratio,
        };
        let mut run = LearnRun {
            model,
            teacher,
            config,
            train,
            heldout,
            best: Best {
                step: 0,
                kl: initial_kl,
                tensors: snapshot(&trained)?,
            },
            scales,
            weights,
            trained,
            scale_opt: AdamW::new(),
            weight_opt: AdamW::new(),
            schedules: (schedule(config.lr), schedule(config.weight_lr)),
            bank: VecDeque::new(),
            banked: 0,
            fresh: CheckpointState {
                step: 0,
                best_step: 0,
                best_kl: initial_kl,
                config: config.clone(),
                base: base.path.display().to_string(),
                data: rows_fingerprint(rows),
            },
            checkpoint,
            start_step: 0,
            on_event,
        };
        if let Some(dir) = checkpoint {
            if checkpoint::exists(dir)? {
                run.restore(dir)?;
            }
        }
        (run.on_event)(&LearnEvent::Started {
            learnable: model.learnable(),
            rows: train.len(),
            heldout_kl: initial_kl,
            start_step: run.start_step,
        });
        Ok(run)
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let mut saved = resume(dir, &self.fresh, &self.scales, &self.weights)?;
        self.best = Best {
            step: saved.state.best_step,
            kl: saved.state.best_kl,
            tensors: take_prefixed(&mut saved.moments, "best/"),
        };
        self.scale_opt
            .restore("scales/", &saved.moments, saved.state.step);
        self.weight_opt
            .restore("weights/", &saved.moments, saved.state.step);
        if let Some(b) = saved.bank {
            self.banked = b.dim(0)?;
            self.bank.push_back(b);
        }
        self.start_step = saved.state.step;
        Ok(())
    }

    /// The memory bank as one tensor, when it holds anything.
    fn bank_tensor(&self) -> Result<Option<Tensor>> {
        if self.bank.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&self.bank.iter().collect::<Vec<_>>(), 0)?))
    }

    /// Keeps the newest teacher representations, up to the bank's size.
    fn remember(&mut self, reps: &Tensor) -> Result<()> {
        if self.config.memory_bank == 0 {
            return Ok(());
        }
        self.banked += reps.dim(0)?;
        self.bank.push_back(reps.clone());
        while self.banked > self.config.memory_bank {
            match self.bank.pop_front() {
                Some(old) => self.banked -= old.dim(0)?,
                None => break,
            }
        }
        Ok(())
    }
}

impl Trainer for LearnRun<'_> {
    fn step(&mut self, step: usize) -> Result<()> {
        let (config, train) = (self.config, self.train);
        let t0 = Instant::now();
        let picked: Vec<Vec<u32>> = (0..config.batch)
            .map(|i| train[(step * config.batch + i) % train.len()].clone())
            .collect();
        let batch = batch_of(&picked)?;
        let view = teacher_view(self.teacher, &batch)?;
        let bank = self.bank_tensor()?;
        let student = self.model.student(self.teacher)?;
        let (kd, contrastive) =
            student_losses(&student, &batch, &view, bank.as_ref(), config.temperature)?;
        let loss = if config.contrastive_weight > 0.0 {
            (&kd + (&contrastive * config.contrastive_weight)?)?
        } else {
            kd.clone()
        };
        let grads = loss.backward()?;
        let lr = self.schedules.0.lr_at(step);
        self.scale_opt
            .step(&self.scales, &grads_of(&grads, &self.scales), lr, 0.0)?;
        if config.train_weights {
            let lr = self.schedules.1.lr_at(step);
            self.weight_opt
                .step(&self.weights, &grads_of(&grads, &self.weights), lr, 0.0)?;
        }
        self.remember(&view.reps)?;
        let tokens: usize = picked.iter().map(Vec::len).sum();
        (self.on_event)(&LearnEvent::Step {
            step: step + 1,
            kl: kd.to_scalar::<f32>()? as f64 - view.entropy,
            contrastive: contrastive.to_scalar::<f32>()? as f64,
            tokens_per_sec: tokens as f64 / t0.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn evaluate(&mut self, done: usize) -> Result<()> {
        let kl = heldout_kl(self.model, self.teacher, self.heldout, self.config.batch)?;
        (self.on_event)(&LearnEvent::Heldout { step: done, kl });
        if kl < self.best.kl {
            self.best = Best {
                step: done,
                kl,
                tensors: snapshot(&self.trained)?,
            };
        }
        Ok(())
    }

    fn checkpoint(&mut self, done: usize) -> Result<()> {
        let Some(dir) = self.checkpoint else {
            return Ok(());
        };
        let state = CheckpointState {
            step: done,
            best_step: self.best.step,
            best_kl: self.best.kl,
            ..self.fresh.clone()
        };
        let mut moments = HashMap::new();
        self.scale_opt.moments("scales/", &mut moments);
        self.weight_opt.moments("weights/", &mut moments);
        for (n, t) in &self.best.tensors {
            moments.insert(format!("best/{n}"), t.clone());
        }
        let bank = self.bank_tensor()?;
        save(
            dir,
            &state,
            &self.scales,
            &self.weights,
            &moments,
            bank.as_ref(),
        )
    }
}

/// Cuts token streams (documents, each ending with an end-of-text token) into rows of
/// `seq_len`, at most `max_rows`; the tail that does not fill a row is dropped.
pub fn calibration_rows(documents: &[Vec<u32>], seq_len: usize, max_rows: usize) -> Vec<Vec<u32>> {
    let mut rows = Vec::new();
    let mut current = Vec::with_capacity(seq_len);
    for doc in documents {
        for &t in doc {
            current.push(t);
            if current.len() == seq_len {
                rows.push(std::mem::replace(&mut current, Vec::with_capacity(seq_len)));
                if rows.len() == max_rows {
                    return rows;
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_rows_are_full_and_bounded() {
        let docs = vec![vec![1, 2, 3], vec![4, 5, 6, 7], vec![8]];
        assert_eq!(
            calibration_rows(&docs, 3, 10),
            vec![vec![1, 2, 3], vec![4, 5, 6]]
        );
        assert_eq!(calibration_rows(&docs, 2, 2), vec![vec![1, 2], vec![3, 4]]);
    }
}
