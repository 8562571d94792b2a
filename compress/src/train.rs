//! Fine-tuning adapters: AdamW with warm-up and cosine decay, gradient accumulation and
//! clipping, packed rows, a held-out loss, and checkpoints that a killed run resumes from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, read_json, swap_in, write_json};
use crate::data::{pack, shuffled, Row, Tokenized};
use crate::model::{AdaptedModel, Batch};
use crate::{AdapterConfig, BaseWeights, Error, Result};

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Rows per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// The learning rate decays (cosine) to this fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = none).
    pub clip: f64,
    /// Held-out loss every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// The last N examples are held out from training.
    pub holdout: usize,
    /// Seed of the data order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch: 1,
            accumulation: 4,
            seq_len: 1536,
            lr: 2e-4,
            warmup: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            clip: 1.0,
            eval_every: 0,
            checkpoint_every: 10,
            holdout: 32,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One point of the loss history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Training loss (mean token cross-entropy of the step).
    pub loss: f64,
    /// Held-out loss, when measured at this step.
    pub heldout: Option<f64>,
    /// Learning rate used.
    pub lr: f64,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Before the first step.
    Started {
        /// Trainable weights.
        trainable: usize,
        /// Training rows (one epoch).
        rows: usize,
        /// Examples cut to fit a row.
        cut: usize,
        /// Step the run starts at (> 0 when resumed).
        start_step: usize,
    },
    /// After each optimizer step.
    Step {
        /// Step number (1-based).
        step: usize,
        /// Training loss.
        loss: f64,
        /// Learning rate.
        lr: f64,
        /// Non-padding tokens per second over this step.
        tokens_per_sec: f64,
    },
    /// A held-out loss was measured.
    Heldout {
        /// After this step.
        step: usize,
        /// Mean token cross-entropy on the held-out examples.
        loss: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// After this step.
        step: usize,
    },
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps done in all (including before a resume).
    pub steps: usize,
    /// Trainable weights.
    pub trainable: usize,
    /// Loss history.
    pub history: Vec<LossPoint>,
    /// Final held-out loss.
    pub heldout_loss: f64,
    /// Held-out loss before training (the base model, or the resumed state).
    pub initial_heldout_loss: Option<f64>,
    /// Non-padding tokens per second over the steps of this process.
    pub tokens_per_sec: f64,
    /// Peak resident memory of the process, bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    adapter: AdapterConfig,
    train: TrainConfig,
    base: String,
    data: String,
    history: Vec<LossPoint>,
    initial_heldout_loss: Option<f64>,
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

    pub(crate) fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t as i32);
        let c2 = 1.0 - Self::B2.powi(self.t as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
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

/// Where a run keeps its resumable state.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// A fingerprint of tokenized data (order-sensitive), so a resume on other data is refused.
pub fn data_fingerprint(data: &[Tokenized]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for ex in data {
        for &t in ex.tokens.iter().chain([&(ex.prompt_len as u32)]) {
            h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{}x{h:016x}", data.len())
}

/// Trains `adapter` on `data` into `out` (resuming from `out/checkpoint` when it holds this
/// run's state), calling `on_event` as it goes. Returns the trained model and a summary;
/// the adapter itself is saved with [`crate::export::save_adapter`] by the caller.
pub fn finetune(
    base: &BaseWeights,
    adapter: &AdapterConfig,
    data: &[Tokenized],
    config: &TrainConfig,
    out: &Path,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(AdaptedModel, TrainSummary)> {
    if config.batch == 0 || config.accumulation == 0 || config.seq_len < 2 {
        return Err(Error::Config(
            "batch, accumulation and seq-len must be positive".into(),
        ));
    }
    if data.len() <= config.holdout {
        return Err(Error::Config(format!(
            "{} examples leave nothing to train on after holding out {}",
            data.len(),
            config.holdout
        )));
    }
    let (train, heldout) = data.split_at(data.len() - config.holdout);
    let model = AdaptedModel::new(base, Some(adapter))?;
    let vars = model.named_vars();
    let mut opt = AdamW {
        m: HashMap::new(),
        v: HashMap::new(),
        t: 0,
    };
    let mut state = State {
        step: 0,
        adapter: adapter.clone(),
        train: config.clone(),
        base: base.path.display().to_string(),
        data: data_fingerprint(data),
        history: Vec::new(),
        initial_heldout_loss: None,
    };
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let ckpt = checkpoint_dir(out);
    if checkpoint::exists(&ckpt)? {
        state = resume(&ckpt, &state, &vars, &mut opt)?;
    }
    // One epoch of rows per seed; later epochs reshuffle.
    let epoch_rows = |epoch: u64| -> (Vec<Row>, usize) {
        pack(
            train,
            &shuffled(train.len(), config.seed.wrapping_add(epoch)),
            config.seq_len,
        )
    };
    let (first, cut) = epoch_rows(0);
    let per_step = config.batch * config.accumulation;
    on_event(&TrainEvent::Started {
        trainable: model.trainable_parameters(),
        rows: first.len(),
        cut,
        start_step: state.step,
    });
    let heldout_rows = pack(
        heldout,
        &(0..heldout.len()).collect::<Vec<_>>(),
        config.seq_len,
    )
    .0;
    if state.initial_heldout_loss.is_none() {
        state.initial_heldout_loss = Some(mean_loss(&model, &heldout_rows, config.batch)?);
    }
    let mut epochs: HashMap<u64, Vec<Row>> = HashMap::from([(0, first)]);
    let rows_per_epoch = epochs[&0].len().max(1);
    let (mut tokens_done, started) = (0usize, Instant::now());
    for step in state.step..config.steps {
        let t0 = Instant::now();
        let lr = config.lr_at(step);
        let picked: Vec<Row> = (0..per_step)
            .map(|i| {
                let global = step * per_step + i;
                let epoch = (global / rows_per_epoch) as u64;
                // Steps only move forward: earlier epochs are never read again.
                epochs.retain(|&e, _| e >= epoch);
                let rows = epochs.entry(epoch).or_insert_with(|| epoch_rows(epoch).0);
                rows[(global % rows_per_epoch).min(rows.len() - 1)].clone()
            })
            .collect();
        let total: usize = picked.iter().map(|r| r.targets.len()).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        for micro in picked.chunks(config.batch) {
            let (loss, n) = batch_loss(&model, micro)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
            let scaled = (loss * (n as f64 / total.max(1) as f64))?;
            let store = scaled.backward()?;
            for (name, var) in &vars {
                if let Some(g) = store.get(var) {
                    let sum = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.clone(), sum);
                }
            }
            tokens_done += micro
                .iter()
                .map(|r| r.segments.iter().sum::<usize>())
                .sum::<usize>();
        }
        if config.clip > 0.0 {
            let mut sq = 0.0f64;
            for g in grads.values() {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            let norm = sq.sqrt();
            if norm > config.clip {
                let k = config.clip / norm;
                for g in grads.values_mut() {
                    *g = (&*g * k)?;
                }
            }
        }
        opt.step(&vars, &grads, lr, config.weight_decay)?;
        let loss = loss_sum / total.max(1) as f64;
        let step_tokens: usize = picked
            .iter()
            .map(|r| r.segments.iter().sum::<usize>())
            .sum();
        on_event(&TrainEvent::Step {
            step: step + 1,
            loss,
            lr,
            tokens_per_sec: step_tokens as f64 / t0.elapsed().as_secs_f64(),
        });
        let mut point = LossPoint {
            step: step + 1,
            loss,
            heldout: None,
            lr,
        };
        let last = step + 1 == config.steps;
        if last || (config.eval_every > 0 && (step + 1) % config.eval_every == 0) {
            let h = mean_loss(&model, &heldout_rows, config.batch)?;
            on_event(&TrainEvent::Heldout {
                step: step + 1,
                loss: h,
            });
            point.heldout = Some(h);
        }
        state.history.push(point);
        state.step = step + 1;
        if last || (config.checkpoint_every > 0 && (step + 1) % config.checkpoint_every == 0) {
            save_checkpoint(&ckpt, &state, &vars, &opt)?;
            on_event(&TrainEvent::Checkpoint { step: step + 1 });
        }
    }
    let heldout_loss = match state.history.last().and_then(|p| p.heldout) {
        Some(h) => h,
        None => mean_loss(&model, &heldout_rows, config.batch)?,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let summary = TrainSummary {
        steps: state.step,
        trainable: model.trainable_parameters(),
        history: state.history,
        heldout_loss,
        initial_heldout_loss: state.initial_heldout_loss,
        tokens_per_sec: if elapsed > 0.0 {
            tokens_done as f64 / elapsed
        } else {
            0.0
        },
        peak_rss_bytes: peak_rss_bytes(),
    };
    Ok((model, summary))
}

/// Mean token cross-entropy of `rows` and the number of target tokens.
fn batch_loss(model: &AdaptedModel, rows: &[Row]) -> Result<(Tensor, usize)> {
    let tokens: Vec<Vec<u32>> = rows.iter().map(|r| r.tokens.clone()).collect();
    let segments: Vec<Vec<usize>> = rows.iter().map(|r| r.segments.clone()).collect();
    let batch = Batch::packed(&tokens, &segments)?;
    let t = tokens[0].len();
    let hidden = model.hidden(&batch)?;
    let n_embd = hidden.dim(2)?;
    let hidden = hidden.reshape((rows.len() * t, n_embd))?;
    let (mut idx, mut tgt) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        for &(p, tok) in &r.targets {
            idx.push((i * t + p) as u32);
            tgt.push(tok);
        }
    }
    let n = idx.len();
    let dev = hidden.device().clone();
    let picked = hidden.index_select(&Tensor::from_vec(idx, n, &dev)?, 0)?;
    let logits = model.logits(&picked)?;
    let loss = crate::fused::cross_entropy(&logits, &tgt)?;
    Ok((loss, n))
}

/// Mean token cross-entropy over all target tokens of `rows`, no gradients kept.
pub fn mean_loss(model: &AdaptedModel, rows: &[Row], batch: usize) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let (loss, k) = batch_loss(model, chunk)?;
        sum += loss.detach().to_scalar::<f32>()? as f64 * k as f64;
        n += k;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

fn save_checkpoint(dir: &Path, state: &State, vars: &[(String, Var)], opt: &AdamW) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&weights, tmp.join("adapter.safetensors"))?;
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    opt.moments("", &mut moments);
    if !moments.is_empty() {
        candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    }
    write_json(&tmp.join("state.json"), state)?;
    swap_in(&tmp, dir)
}

fn resume(dir: &Path, fresh: &State, vars: &[(String, Var)], opt: &mut AdamW) -> Result<State> {
    let saved: State = read_json(&dir.join("state.json"))?;
    let mismatch = |message: String| Error::CheckpointMismatch {
        path: dir.to_path_buf(),
        message,
    };
    if saved.adapter != fresh.adapter {
        return Err(mismatch(format!(
            "adapter {:?} vs {:?}",
            saved.adapter, fresh.adapter
        )));
    }
    if saved.data != fresh.data {
        return Err(mismatch("the training data differs".into()));
    }
    if saved.base != fresh.base {
        return Err(mismatch(format!(
            "base model {} vs {}",
            saved.base, fresh.base
        )));
    }
    let mut comparable = saved.train.clone();
    comparable.steps = fresh.train.steps; // more steps may be asked for later
    comparable.checkpoint_every = fresh.train.checkpoint_every;
    comparable.eval_every = fresh.train.eval_every;
    if comparable != fresh.train {
        return Err(mismatch(format!(
            "training settings {:?} vs {:?}",
            saved.train, fresh.train
        )));
    }
    let weights =
        candle_core::safetensors::load(dir.join("adapter.safetensors"), &candle_core::Device::Cpu)?;
    for (name, var) in vars {
        let t = weights
            .get(name)
            .ok_or_else(|| mismatch(format!("variable {name} is missing")))?;
        var.set(t)?;
    }
    let opt_path = dir.join("optimizer.safetensors");
    let moments = if opt_path.is_file() {
        candle_core::safetensors::load(&opt_path, &candle_core::Device::Cpu)?
    } else {
        HashMap::new()
    };
    opt.restore("", &moments, saved.step);
    Ok(State {
        train: fresh.train.clone(),
        ..saved
    })
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_its_floor() {
        let c = TrainConfig {
            steps: 100,
            warmup: 10,
            lr: 1e-3,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!(c.lr_at(50) < 1e-3 && c.lr_at(50) > 1e-4);
        assert!((c.lr_at(100) - 1e-4).abs() < 1e-9);
    }
}
