//! Recovery of a pruned model: its kept linear weights fine-tuned by distillation from the
//! unpruned model — the weights themselves, or low-rank (LoRA) updates merged into them
//! afterwards — with checkpoints and resume.

use super::*;
use crate::{AdapterConfig, AdapterKind};

/// How a pruned model is fine-tuned after extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoverConfig {
    /// Optimizer steps (0: none).
    pub steps: usize,
    /// Calibration rows per step.
    pub batch: usize,
    /// Peak learning rate (AdamW; warm-up, then cosine decay).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Calibration rows held out to measure KL.
    pub holdout: usize,
    /// Save a resumable checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Measure held-out KL every this many steps (and after the last).
    pub eval_every: usize,
    /// Rank of the low-rank updates trained instead of the weights (0: the weights
    /// themselves). Full recovery keeps a trainable copy, a gradient and two AdamW moments of
    /// every kept weight (16 bytes each: ~16 GB for the 1.5B's 0.98 B kept at 0.75); LoRA
    /// updates of rank 16 on all seven linears of every layer train 1.5% as many weights
    /// (15.1 M there). They start at zero and are merged into the weights when recovery ends.
    /// Their learning rate wants to be ~10–20× the full recovery's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lora_rank: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Default for RecoverConfig {
    fn default() -> Self {
        RecoverConfig {
            steps: 100,
            batch: 4,
            lr: 5e-5,
            warmup: 5,
            holdout: 4,
            checkpoint_every: 25,
            eval_every: 25,
            lora_rank: 0,
        }
    }
}

/// What a recovery checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RecoverState {
    step: usize,
    config: RecoverConfig,
    base: String,
    data: String,
    /// Shapes of the pruned model's weights: a checkpoint of another size is refused.
    shapes: String,
}

/// What recovery did: held-out KL(teacher ‖ pruned) before and after.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recovered {
    /// Held-out KL of the extracted model.
    pub initial_kl: f64,
    /// Held-out KL after recovery.
    pub final_kl: f64,
}

/// Fine-tunes the linear weights of `pruned` (cut from `teacher_base` by [`extract`]) to match
/// the unpruned model on calibration `rows`; returns the recovered model (taking `pruned`,
/// whose replaced weights are freed as the recovered ones are made). With no steps, the
/// extracted model as it is and its held-out KL, no training state built (on the 1.5B the
/// trainable copies and optimizer alone overflow 24 GB).
pub fn recover(
    teacher_base: &BaseWeights,
    pruned: BaseWeights,
    rows: &[Vec<u32>],
    config: &RecoverConfig,
    checkpoint: Option<&Path>,
    on_event: &mut dyn FnMut(&PruneEvent),
) -> Result<(BaseWeights, Recovered)> {
    check_rows(rows, config.holdout)?;
    let teacher = AdaptedModel::new(teacher_base, None)?;
    let frozen = AdaptedModel::new(&pruned, None)?;
    if config.steps == 0 {
        let heldout = &rows[rows.len() - config.holdout..];
        let kl = mean_kl(&frozen, &teacher, heldout, config.batch)?;
        let recovered = Recovered {
            initial_kl: kl,
            final_kl: kl,
        };
        return Ok((pruned, recovered));
    }
    let (student, named) = trainable(&pruned, &frozen, config.lora_rank)?;
    let (train, heldout) = rows.split_at(rows.len() - config.holdout);
    let shapes = named
        .iter()
        .map(|(_, v)| format!("{:?}", v.dims()))
        .collect::<Vec<_>>()
        .join(",");
    let initial_kl = mean_kl(&student, &teacher, heldout, config.batch)?;
    let mut run = RecoverRun {
        t: Training {
            teacher: &teacher,
            named,
            opt: AdamW::new(),
            train,
            heldout,
            checkpoint,
            on_event,
        },
        student: &student,
        config,
        state: RecoverState {
            step: 0,
            config: config.clone(),
            base: teacher_base.path.display().to_string(),
            data: rows_fingerprint(rows),
            shapes,
        },
        final_kl: initial_kl,
    };
    if let Some(dir) = checkpoint {
        if checkpoint::exists(dir)? {
            run.restore(dir)?;
        }
    }
    let start = run.state.step;
    (run.t.on_event)(&PruneEvent::RecoverStarted {
        weights: run.t.named.iter().map(|(_, v)| v.elem_count()).sum(),
        heldout_kl: initial_kl,
        start_step: start,
    });
    let cadence = Cadence::of_run(
        config.steps,
        config.eval_every,
        config.checkpoint_every,
        checkpoint.is_some(),
    );
    optim::run(&mut run, start, cadence)?;
    if start >= config.steps {
        // Resumed from a finished run's checkpoint: no step ran, so nothing measured the
        // weights it restored.
        run.evaluate(config.steps)?;
    }
    let recovered = Recovered {
        initial_kl,
        final_kl: run.final_kl,
    };
    let named = std::mem::take(&mut run.t.named);
    drop(run);
    drop((frozen, teacher));
    Ok((
        trained_model(pruned, student, named, config.lora_rank > 0)?,
        recovered,
    ))
}

/// `pruned` with what recovery trained: its low-rank updates merged in, or the trained copies
/// of its weights.
fn trained_model(
    pruned: BaseWeights,
    student: AdaptedModel,
    named: NamedVars,
    low_rank: bool,
) -> Result<BaseWeights> {
    if low_rank {
        return crate::export::merge_into(student, pruned);
    }
    let trained = named
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    pruned.with_tensors(trained)
}

/// The student recovery trains and its trainable variables: `frozen` with low-rank updates of
/// `lora_rank` on every linear layer, or (rank 0) with trainable copies of its linear weights.
fn trainable(
    pruned: &BaseWeights,
    frozen: &AdaptedModel,
    lora_rank: usize,
) -> Result<(AdaptedModel, NamedVars)> {
    if lora_rank > 0 {
        let adapter = AdapterConfig {
            rank: lora_rank,
            alpha: 2.0 * lora_rank as f64,
            ..AdapterConfig::new(AdapterKind::Lora)
        };
        let student = AdaptedModel::new(pruned, Some(&adapter))?;
        let named = student.named_vars();
        return Ok((student, named));
    }
    let mut named: NamedVars = Vec::new();
    for name in pruned.names() {
        let t = pruned.get(name)?;
        if name.starts_with("blk.") && t.rank() == 2 {
            named.push((name.clone(), Var::from_tensor(t)?));
        }
    }
    let by_name: HashMap<String, Tensor> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let student = frozen.with_weights(None, |layer, target, _| {
        Ok(by_name[&format!("blk.{layer}.{}.weight", target.gguf())].clone())
    })?;
    Ok((student, named))
}

/// A recovery run in progress.
struct RecoverRun<'a> {
    t: Training<'a>,
    student: &'a AdaptedModel,
    config: &'a RecoverConfig,
    state: RecoverState,
    final_kl: f64,
}

impl RecoverRun<'_> {
    fn restore(&mut self, dir: &Path) -> Result<()> {
        let saved: RecoverState = read_json(&dir.join("state.json"))?;
        // More steps, or another cadence, continue the same run.
        let comparable = |s: &RecoverState| RecoverState {
            step: 0,
            config: RecoverConfig {
                steps: 0,
                checkpoint_every: 0,
                eval_every: 0,
                ..s.config.clone()
            },
            ..s.clone()
        };
        if comparable(&saved) != comparable(&self.state) {
            return Err(Error::CheckpointMismatch {
                path: dir.to_path_buf(),
                message: "another model, size, calibration text or recovery settings".into(),
            });
        }
        load_run(dir, &self.t.named, &mut self.t.opt, saved.step)?;
        self.state.step = saved.step;
        Ok(())
    }
}

impl Trainer for RecoverRun<'_> {
    fn step(&mut self, step: usize) -> Result<()> {
        let t0 = Instant::now();
        let picked = rows_of_step(self.t.train, step, self.config.batch);
        let batch = batch_of(&picked)?;
        let view = teacher_view(self.t.teacher, &batch)?;
        let h = self.student.hidden(&batch)?;
        let (b, t, e) = h.dims3()?;
        let kd = soft_cross_entropy(&self.student.logits(&h.reshape((b * t, e))?)?, &view.probs)?;
        let grads = kd.backward()?;
        let schedule = optim::Schedule {
            lr: self.config.lr,
            warmup: self.config.warmup,
            steps: self.config.steps,
            min_ratio: 0.1,
        };
        self.t.opt.step(
            &self.t.named,
            &grads_of(&grads, &self.t.named),
            schedule.lr_at(step),
            0.0,
        )?;
        self.state.step = step + 1;
        (self.t.on_event)(&PruneEvent::RecoverStep {
            step: step + 1,
            kl: kd.to_scalar::<f32>()? as f64 - view.entropy,
            tokens_per_sec: (b * t) as f64 / t0.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn evaluate(&mut self, done: usize) -> Result<()> {
        let kl = mean_kl(
            self.student,
            self.t.teacher,
            self.t.heldout,
            self.config.batch,
        )?;
        self.final_kl = kl;
        (self.t.on_event)(&PruneEvent::RecoverHeldout { step: done, kl });
        Ok(())
    }

    fn checkpoint(&mut self, done: usize) -> Result<()> {
        self.t.save(&RecoverState {
            step: done,
            ..self.state.clone()
        })
    }
}
