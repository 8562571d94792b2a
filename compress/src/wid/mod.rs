//! Weight-Inherited Distillation of the retriever's sentence encoder (WID: Wu et al.,
//! Findings of NAACL 2024), and the plain-distillation baseline it is measured against.
//!
//! **WID** ([`Method::Wid`]): the student inherits the teacher's frozen weights through
//! trainable row and column compactors (see [`student`](self) for where each sits), trained
//! with the retrieval task's loss — in-batch contrastive loss over (query, gold passage)
//! pairs — in three phases:
//! 1. compactors from the identity (the student is the teacher) under a group-lasso
//!    penalty on their columns, until `select_at` of the steps, while each column's
//!    first-order importance (`|Σᵢ gᵢⱼ·cᵢⱼ|`, the loss change its removal would cause) is
//!    summed over the steps;
//! 2. the columns of least importance in each compactor are chosen to reach the target
//!    widths (for attention: the least important heads whole, then the same number of
//!    dimensions in each kept head), and their scale falls linearly to 0 until `removed_by`
//!    of the steps, while training goes on;
//! 3. training at the final structure.
//!
//! Then the compactors are folded into the weights (structural re-parameterization): a
//! smaller BERT that computes what the student computed.
//!
//! **Plain distillation** ([`Method::Kd`]): the student of the same widths is the teacher
//! truncated (the first dimensions of every group), trained on the same texts to give the
//! teacher's in-batch cosine similarities (mean squared error; the widths differ, so the
//! similarities are what can be matched).
//!
//! The differences from the paper: the columns to remove are chosen by first-order
//! importance and faded out on a schedule, rather than driven to zero by the sparsity
//! penalty alone (with Adam and the small learning rates compactors tolerate, the penalty
//! moves column norms too little to rank them); and the task is retrieval, not masked
//! language modelling.

mod run;
mod student;

use std::path::Path;

use geek_retriever::dense::{Bert, BertConfig};
use serde::{Deserialize, Serialize};

use crate::{checkpoint, Error, Result};

pub use run::compress_encoder;
pub use student::{layer_parameters, Removal, Widths};

/// A training pair: a query and the passage that answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPair {
    /// The query (a question or a sub-question).
    pub query: String,
    /// The passage's id (no two pairs of a batch share a passage).
    pub passage_id: String,
    /// The passage's text, as the index embeds it.
    pub passage: String,
}

/// How the student is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weight-inherited distillation: compactors on the teacher's weights, task loss.
    Wid,
    /// The baseline: a truncated teacher trained to match the teacher's similarities.
    Kd,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "wid" => Ok(Method::Wid),
            "kd" => Ok(Method::Kd),
            other => Err(Error::Config(format!(
                "unknown encoder compression method `{other}` (wid or kd)"
            ))),
        }
    }
}

/// How a student is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidConfig {
    /// The student's widths.
    pub widths: Widths,
    /// WID or the baseline.
    pub method: Method,
    /// Optimizer steps.
    pub steps: usize,
    /// Pairs per step.
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine to a tenth).
    pub lr: f64,
    /// The shared hidden compactor's learning rate, as a multiple of `lr` (WID).
    pub hidden_lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Weight of the group-lasso penalty on compactor columns (WID's first phase).
    pub penalty: f64,
    /// Fraction of the steps after which the dimensions to remove are chosen (WID).
    pub select_at: f64,
    /// Fraction of the steps by which they are gone (WID).
    pub removed_by: f64,
    /// Tokens a text is cut to in training.
    pub max_tokens: usize,
    /// Scale of the contrastive logits (cosine × scale; sentence-transformers uses 20).
    pub scale: f64,
    /// Weight of the teacher's in-batch ranking as soft labels beside the gold passage (WID;
    /// 0: the task's hard labels alone).
    pub soft_labels: f64,
    /// Pairs held out (from the end) for the held-out loss.
    pub holdout: usize,
    /// Evaluate every N steps (0: at the end only).
    pub eval_every: usize,
    /// Checkpoint every N steps.
    pub checkpoint_every: usize,
    /// Batch-order seed.
    pub seed: u64,
}

impl WidConfig {
    /// The defaults of `method` for a student of `widths`.
    pub fn new(method: Method, widths: Widths) -> WidConfig {
        WidConfig {
            widths,
            method,
            steps: 600,
            batch: 16,
            lr: match method {
                Method::Wid => 5e-5,
                Method::Kd => 1e-4,
            },
            hidden_lr: 1.0,
            warmup: 20,
            penalty: 1e-2,
            select_at: 0.25,
            removed_by: 0.6,
            max_tokens: 128,
            scale: 20.0,
            soft_labels: 0.0,
            holdout: 256,
            eval_every: 100,
            checkpoint_every: 25,
            seed: 0,
        }
    }

    fn check(&self, teacher: &BertConfig, pairs: usize) -> Result<()> {
        self.widths.check(teacher)?;
        let ok = self.steps > 0
            && self.batch >= 2
            && self.max_tokens >= 2
            && (0.0..1.0).contains(&self.select_at)
            && self.select_at < self.removed_by
            && self.removed_by <= 1.0
            && self.soft_labels >= 0.0
            && self.hidden_lr >= 0.0;
        if !ok {
            return Err(Error::Config(
                "WID needs steps ≥ 1, a batch ≥ 2, max tokens ≥ 2, 0 ≤ select_at < removed_by ≤ 1 and soft labels and the hidden rate ≥ 0".into(),
            ));
        }
        if pairs < self.holdout + 2 * self.batch || self.holdout < self.batch {
            return Err(Error::Config(format!(
                "{pairs} pairs: need at least {} (a held-out set of ≥ one batch, two batches to train on)",
                3 * self.batch.max(self.holdout / 2)
            )));
        }
        Ok(())
    }

    /// The step after which the dimensions to remove are chosen, and the step by which they
    /// are gone.
    fn removal_steps(&self) -> (usize, usize) {
        let at = |f: f64| (f * self.steps as f64).round() as usize;
        let select = at(self.select_at).clamp(1, self.steps);
        (select, at(self.removed_by).clamp(select, self.steps))
    }
}

/// Progress of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum WidEvent {
    /// Training starts (or resumes at `start_step`).
    Started {
        /// Pairs trained on.
        pairs: usize,
        /// Pairs held out.
        heldout: usize,
        /// Trainable weights.
        trainable: usize,
        /// The step it starts at.
        start_step: usize,
    },
    /// One optimizer step.
    Step {
        /// Steps done.
        step: usize,
        /// The batch's loss.
        loss: f64,
        /// What is left of the dimensions being removed (1 before, 0 once gone).
        remaining: f64,
        /// Training tokens per second.
        tokens_per_sec: f64,
    },
    /// The dimensions to remove were chosen.
    Selected(Removal),
    /// Held-out figures.
    Heldout {
        /// Steps done.
        step: usize,
        /// The figures.
        score: Heldout,
    },
}

/// Held-out retrieval figures: in-batch contrastive loss and top-1 accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Heldout {
    /// Mean contrastive loss.
    pub loss: f64,
    /// Fraction of queries whose own passage scores highest in their batch.
    pub top1: f64,
}

/// What a run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidSummary {
    /// The settings.
    pub config: WidConfig,
    /// Pairs trained on.
    pub pairs: usize,
    /// The teacher's non-embedding parameters.
    pub teacher_parameters: usize,
    /// The student's.
    pub student_parameters: usize,
    /// The teacher on the held-out pairs.
    pub teacher_heldout: Heldout,
    /// The folded student on them.
    pub student_heldout: Heldout,
    /// The largest difference between an embedding of the student before folding and of the
    /// folded model, over the first held-out batch (rounding only; 0 for the baseline).
    pub fold_max_error: f64,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// Writes `student` where [`Encoder::load`] reads it: `config.json`, `model.safetensors`,
/// and the teacher's `tokenizer.json` (the vocabulary is the teacher's).
pub fn save_student(student: &Bert, teacher_dir: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    checkpoint::write_json(&out.join("config.json"), &student.config)?;
    candle_core::safetensors::save(student.tensors(), out.join("model.safetensors"))?;
    let tokenizer = teacher_dir.join("tokenizer.json");
    std::fs::copy(&tokenizer, out.join("tokenizer.json")).map_err(Error::io(&tokenizer))?;
    Ok(())
}

#[cfg(test)]
mod tests;
