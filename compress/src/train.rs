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
use crate::optim::{
    self, accumulate, clip_global_norm, fingerprint, AdamW, Cadence, NamedVars, Schedule, Trainer,
};
use crate::stream_cache::StreamCache;
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
    /// Where a top-layers adapter's lower-layer streams are also kept on disk, shared by runs
    /// on the same base model and layer (`None`: `OUT/lower-streams`).
    #[serde(default)]
    pub stream_cache: Option<PathBuf>,
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
            stream_cache: None,
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            warmup: self.warmup,
            steps: self.steps,
            min_ratio: self.min_lr_ratio,
        }
    }

    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.schedule().lr_at(step)
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
    /// Bytes of the lower layers' streams kept for a top-layers adapter (0 without one).
    #[serde(default)]
    pub stream_cache_bytes: u64,
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

/// Where a run keeps its resumable state.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// A fingerprint of tokenized data (order-sensitive), so a resume on other data is refused.
pub fn data_fingerprint(data: &[Tokenized]) -> String {
    let rows: Vec<Vec<u32>> = data
        .iter()
        .map(|ex| {
            let mut r = ex.tokens.clone();
            r.push(ex.prompt_len as u32);
            // (Examples without context spans keep the fingerprint they had before spans.)
            for &(start, end) in &ex.context {
                r.extend([u32::MAX, start as u32, end as u32]);
            }
            r
        })
        .collect();
    fingerprint(rows.iter().map(Vec::as_slice), None)
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
    let model = AdaptedModel::new(base, Some(adapter))?;
    let summary = {
        let mut run = FinetuneRun::start(&model, base, adapter, data, config, out, on_event)?;
        let cadence = Cadence {
            steps: config.steps,
            eval_every: config.eval_every,
            checkpoint_every: config.checkpoint_every,
        };
        let start = run.state.step;
        optim::run(&mut run, start, cadence)?;
        run.summary()?
    };
    Ok((model, summary))
}

/// A finetune in progress: what its steps, evaluations and checkpoints share.
struct FinetuneRun<'a> {
    model: &'a AdaptedModel,
    vars: NamedVars,
    opt: AdamW,
    state: State,
    config: &'a TrainConfig,
    train: &'a [Tokenized],
    /// Packed rows by epoch (each epoch reshuffled); only the current one is kept.
    epochs: HashMap<u64, Vec<Row>>,
    rows_per_epoch: usize,
    heldout_rows: Vec<Row>,
    /// The frozen layers' output below a top-layers adapter, by example.
    lower: Option<StreamCache>,
    checkpoint: PathBuf,
    tokens_done: usize,
    started: Instant,
    on_event: &'a mut dyn FnMut(&TrainEvent),
}

impl<'a> FinetuneRun<'a> {
    /// Sets the run up (resuming from its checkpoint) and reports it started.
    fn start(
        model: &'a AdaptedModel,
        base: &BaseWeights,
        adapter: &AdapterConfig,
        data: &'a [Tokenized],
        config: &'a TrainConfig,
        out: &Path,
        on_event: &'a mut dyn FnMut(&TrainEvent),
    ) -> Result<Self> {
        let (train, heldout) = data.split_at(data.len() - config.holdout);
        let vars = model.named_vars();
        let mut opt = AdamW::new();
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
        let (first, cut) = epoch_rows(train, config, 0);
        on_event(&TrainEvent::Started {
            trainable: model.trainable_parameters(),
            rows: first.len(),
            cut,
            start_step: state.step,
        });
        let all: Vec<usize> = (0..heldout.len()).collect();
        let heldout_rows = pack(heldout, &all, config.seq_len).0;
        let mut lower = match adapter.first_layer(model.config().n_layer) {
            0 => None,
            first => {
                let dir = config
                    .stream_cache
                    .clone()
                    .unwrap_or_else(|| out.join("lower-streams"));
                Some(StreamCache::new(first, &base.path, &dir)?)
            }
        };
        if state.initial_heldout_loss.is_none() {
            state.initial_heldout_loss =
                Some(mean_loss(model, &heldout_rows, config.batch, &mut lower)?);
        }
        let rows_per_epoch = first.len().max(1);
        Ok(FinetuneRun {
            model,
            vars,
            opt,
            state,
            config,
            train,
            epochs: HashMap::from([(0, first)]),
            rows_per_epoch,
            heldout_rows,
            lower,
            checkpoint: ckpt,
            tokens_done: 0,
            started: Instant::now(),
            on_event,
        })
    }

    /// The rows of optimizer step `step`.
    fn rows_of_step(&mut self, step: usize) -> Vec<Row> {
        let per_step = self.config.batch * self.config.accumulation;
        (0..per_step)
            .map(|i| {
                let global = step * per_step + i;
                let epoch = (global / self.rows_per_epoch) as u64;
                // Steps only move forward: earlier epochs are never read again.
                self.epochs.retain(|&e, _| e >= epoch);
                let (train, config) = (self.train, self.config);
                let rows = self
                    .epochs
                    .entry(epoch)
                    .or_insert_with(|| epoch_rows(train, config, epoch).0);
                rows[(global % self.rows_per_epoch).min(rows.len() - 1)].clone()
            })
            .collect()
    }

    /// Mean loss over the held-out rows, no gradients kept.
    fn heldout_loss(&mut self) -> Result<f64> {
        mean_loss(
            self.model,
            &self.heldout_rows,
            self.config.batch,
            &mut self.lower,
        )
    }

    fn summary(&mut self) -> Result<TrainSummary> {
        let heldout_loss = match self.state.history.last().and_then(|p| p.heldout) {
            Some(h) => h,
            None => self.heldout_loss()?,
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        Ok(TrainSummary {
            steps: self.state.step,
            trainable: self.model.trainable_parameters(),
            history: self.state.history.clone(),
            heldout_loss,
            initial_heldout_loss: self.state.initial_heldout_loss,
            tokens_per_sec: if elapsed > 0.0 {
                self.tokens_done as f64 / elapsed
            } else {
                0.0
            },
            peak_rss_bytes: peak_rss_bytes(),
            stream_cache_bytes: self.lower.as_ref().map_or(0, |c| c.bytes() as u64),
        })
    }
}

impl Trainer for FinetuneRun<'_> {
    fn step(&mut self, step: usize) -> Result<()> {
        let t0 = Instant::now();
        let lr = self.config.lr_at(step);
        let picked = self.rows_of_step(step);
        let total: usize = picked.iter().map(|r| r.targets.len()).sum();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        for micro in picked.chunks(self.config.batch) {
            let (loss, n) = batch_loss(self.model, micro, &mut self.lower)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
            let scaled = (loss * (n as f64 / total.max(1) as f64))?;
            accumulate(&mut grads, &scaled.backward()?, &self.vars)?;
        }
        clip_global_norm(&mut grads, self.config.clip)?;
        self.opt
            .step(&self.vars, &grads, lr, self.config.weight_decay)?;
        let loss = loss_sum / total.max(1) as f64;
        let step_tokens: usize = picked
            .iter()
            .map(|r| r.segments.iter().sum::<usize>())
            .sum();
        self.tokens_done += step_tokens;
        (self.on_event)(&TrainEvent::Step {
            step: step + 1,
            loss,
            lr,
            tokens_per_sec: step_tokens as f64 / t0.elapsed().as_secs_f64(),
        });
        self.state.history.push(LossPoint {
            step: step + 1,
            loss,
            heldout: None,
            lr,
        });
        self.state.step = step + 1;
        Ok(())
    }

    fn evaluate(&mut self, done: usize) -> Result<()> {
        let h = self.heldout_loss()?;
        (self.on_event)(&TrainEvent::Heldout {
            step: done,
            loss: h,
        });
        if let Some(point) = self.state.history.last_mut() {
            point.heldout = Some(h);
        }
        Ok(())
    }

    fn checkpoint(&mut self, done: usize) -> Result<()> {
        save_checkpoint(&self.checkpoint, &self.state, &self.vars, &self.opt)?;
        (self.on_event)(&TrainEvent::Checkpoint { step: done });
        Ok(())
    }
}

/// One epoch of packed training rows (shuffled by seed + epoch) and the examples cut to fit.
fn epoch_rows(train: &[Tokenized], config: &TrainConfig, epoch: u64) -> (Vec<Row>, usize) {
    pack(
        train,
        &shuffled(train.len(), config.seed.wrapping_add(epoch)),
        config.seq_len,
    )
}

/// Mean token cross-entropy of `rows` and the number of target tokens. With a stream cache
/// (a top-layers adapter), the rows enter at its first layer.
fn batch_loss(
    model: &AdaptedModel,
    rows: &[Row],
    lower: &mut Option<StreamCache>,
) -> Result<(Tensor, usize)> {
    let tokens: Vec<Vec<u32>> = rows.iter().map(|r| r.tokens.clone()).collect();
    let segments: Vec<Vec<usize>> = rows.iter().map(|r| r.segments.clone()).collect();
    let batch = Batch::packed(&tokens, &segments)?;
    let t = tokens[0].len();
    let hidden = match lower {
        Some(cache) => {
            let x = cache.rows_input(model, rows)?;
            model.hidden_from(&batch, cache.first_layer(), x)?
        }
        None => model.hidden(&batch)?,
    };
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
fn mean_loss(
    model: &AdaptedModel,
    rows: &[Row],
    batch: usize,
    lower: &mut Option<StreamCache>,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let (loss, k) = batch_loss(model, chunk, lower)?;
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
    comparable.stream_cache = fresh.train.stream_cache.clone(); // where it is kept may move
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
