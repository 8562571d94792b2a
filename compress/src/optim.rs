//! What every training loop here shares: AdamW with savable moments, the learning-rate
//! schedule, gradient collection, accumulation and clipping, and the step loop itself
//! ([`run`] over a [`Trainer`]: step, evaluate every N steps, checkpoint every M).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// Named trainable variables.
pub type NamedVars = Vec<(String, Var)>;

/// Linear warm-up, then cosine decay to a floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Steps in all.
    pub steps: usize,
    /// The floor, as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// AdamW whose moments can be saved and restored.
pub(crate) struct AdamW {
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    t: usize,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub(crate) fn new() -> AdamW {
        AdamW {
            m: HashMap::new(),
            v: HashMap::new(),
            t: 0,
        }
    }

    /// The moments as `{prefix}{name}.m` / `.v` tensors.
    pub(crate) fn moments(&self, prefix: &str, out: &mut HashMap<String, Tensor>) {
        for (n, m) in &self.m {
            out.insert(format!("{prefix}{n}.m"), m.clone());
        }
        for (n, v) in &self.v {
            out.insert(format!("{prefix}{n}.v"), v.clone());
        }
    }

    /// Restores the moments saved under `prefix` and the step count.
    pub(crate) fn restore(&mut self, prefix: &str, saved: &HashMap<String, Tensor>, t: usize) {
        for (name, tensor) in saved {
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            if let Some(n) = rest.strip_suffix(".m") {
                self.m.insert(n.to_string(), tensor.clone());
            } else if let Some(n) = rest.strip_suffix(".v") {
                self.v.insert(n.to_string(), tensor.clone());
            }
        }
        self.t = t;
    }

    /// One update of `vars` by `grads` at learning rate `lr` with weight decay `wd`.
    pub(crate) fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        self.step_scaled(vars, grads, lr, wd, &|_| 1.0)
    }

    /// [`AdamW::step`] with the learning rate of each variable multiplied by `scale(name)`.
    pub(crate) fn step_scaled(
        &mut self,
        vars: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
        wd: f64,
        scale: &dyn Fn(&str) -> f64,
    ) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t as i32);
        let c2 = 1.0 - Self::B2.powi(self.t as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let lr = lr * scale(name);
            let m = match self.m.get(name) {
                Some(m) => ((m * Self::B1)? + (g * (1.0 - Self::B1))?)?,
                None => (g * (1.0 - Self::B1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?,
                None => (g.sqr()? * (1.0 - Self::B2))?,
            };
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + Self::EPS)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * wd))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// The gradients of `vars` in `store`, by name, detached: candle leaves a variable's gradient
/// attached to the forward tensors it was computed from (when a variable multiplies a tensor
/// derived from another variable), and Adam's moments would then keep every step's graph
/// alive (measured: 1 GB more memory per step for weight-inherited distillation).
pub(crate) fn grads_of(store: &GradStore, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.detach())))
        .collect()
}

/// Adds the gradients of `vars` in `store` to `acc` (gradient accumulation).
pub(crate) fn accumulate(
    acc: &mut HashMap<String, Tensor>,
    store: &GradStore,
    vars: &[(String, Var)],
) -> Result<()> {
    for (name, var) in vars {
        if let Some(g) = store.get(var) {
            let g = g.detach();
            let sum = match acc.remove(name) {
                Some(a) => (a + g)?,
                None => g,
            };
            acc.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// Scales `grads` down so their global L2 norm is at most `max` (0: no clipping).
pub(crate) fn clip_global_norm(grads: &mut HashMap<String, Tensor>, max: f64) -> Result<()> {
    if max <= 0.0 {
        return Ok(());
    }
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if norm > max {
        let k = max / norm;
        for g in grads.values_mut() {
            *g = (&*g * k)?;
        }
    }
    Ok(())
}

/// A training run the step loop drives.
pub(crate) trait Trainer {
    /// One optimizer step (0-based `step`).
    fn step(&mut self, step: usize) -> Result<()>;
    /// Held-out evaluation after `done` steps.
    fn evaluate(&mut self, done: usize) -> Result<()>;
    /// Saves a resumable checkpoint after `done` steps.
    fn checkpoint(&mut self, done: usize) -> Result<()>;
}

/// How often a loop evaluates and checkpoints (0: only after the last step).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cadence {
    pub(crate) steps: usize,
    pub(crate) eval_every: usize,
    pub(crate) checkpoint_every: usize,
}

impl Cadence {
    /// `steps` steps, evaluating every `eval_every`, checkpointing every `checkpoint_every`
    /// — never, when the run has no checkpoint directory.
    pub(crate) fn of_run(
        steps: usize,
        eval_every: usize,
        checkpoint_every: usize,
        checkpointed: bool,
    ) -> Cadence {
        Cadence {
            steps,
            eval_every,
            checkpoint_every: if checkpointed {
                checkpoint_every
            } else {
                usize::MAX
            },
        }
    }
}

/// Steps `trainer` from `start` to `cadence.steps`, evaluating and checkpointing as due
/// (both always after the last step).
pub(crate) fn run(trainer: &mut impl Trainer, start: usize, cadence: Cadence) -> Result<()> {
    let due = |done: usize, every: usize| {
        done == cadence.steps || (every > 0 && done.is_multiple_of(every))
    };
    for step in start..cadence.steps {
        trainer.step(step)?;
        let done = step + 1;
        if due(done, cadence.eval_every) {
            trainer.evaluate(done)?;
        }
        if due(done, cadence.checkpoint_every) {
            trainer.checkpoint(done)?;
        }
    }
    Ok(())
}

/// FNV-1a over token ids (each row followed by `separator`, when given): a fingerprint of
/// training data, so a resume on other data is refused.
pub(crate) fn fingerprint<'a>(
    rows: impl IntoIterator<Item = &'a [u32]>,
    separator: Option<u32>,
) -> String {
    let (mut h, mut n) = (0xcbf2_9ce4_8422_2325u64, 0usize);
    for row in rows {
        n += 1;
        for &t in row.iter().chain(separator.as_ref()) {
            h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{n}x{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_its_floor() {
        let s = Schedule {
            lr: 1.0,
            warmup: 2,
            steps: 10,
            min_ratio: 0.1,
        };
        assert!((s.lr_at(0) - 0.5).abs() < 1e-12);
        assert!((s.lr_at(1) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(2) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 0.1).abs() < 1e-12);
        assert!(s.lr_at(6) < s.lr_at(3));
    }

    struct Count(Vec<String>);

    impl Trainer for Count {
        fn step(&mut self, step: usize) -> Result<()> {
            self.0.push(format!("s{step}"));
            Ok(())
        }
        fn evaluate(&mut self, done: usize) -> Result<()> {
            self.0.push(format!("e{done}"));
            Ok(())
        }
        fn checkpoint(&mut self, done: usize) -> Result<()> {
            self.0.push(format!("c{done}"));
            Ok(())
        }
    }

    #[test]
    fn the_loop_evaluates_and_checkpoints_when_due_and_at_the_end() {
        let mut t = Count(Vec::new());
        let cadence = Cadence {
            steps: 5,
            eval_every: 2,
            checkpoint_every: 0,
        };
        run(&mut t, 1, cadence).unwrap();
        assert_eq!(
            t.0,
            ["s1", "e2", "s2", "s3", "e4", "s4", "e5", "c5"].map(String::from)
        );
    }
}
