//! The training run behind [`compress_encoder`]: the student (compactors or a truncated
//! copy), its embeddings, the loss of a batch, checkpoints and resume.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use geek_retriever::dense::{forward_with, mean_pool_normalized, Bert, BertConfig, Encoder};
use serde::{Deserialize, Serialize};

use super::student::{self, fold, layer_parameters, truncation, Compactors, Removal, Widths};
use super::{Heldout, Method, TextPair, WidConfig, WidEvent, WidSummary};
use crate::checkpoint::{self, load_run, read_json, save_run};
use crate::optim::{self, grads_of, AdamW, Cadence, NamedVars, Trainer};
use crate::{Error, Result};

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WidState {
    step: usize,
    removal: Option<Removal>,
    config: WidConfig,
    teacher: String,
    data: String,
}

/// Trains a student of `teacher` on `pairs` (the last `config.holdout` held out) and returns
/// it folded into a plain BERT. With `checkpoint`, the run saves its state there and resumes
/// from it when rerun with the same teacher, pairs and settings.
pub fn compress_encoder(
    teacher: &Encoder,
    pairs: &[TextPair],
    config: &WidConfig,
    checkpoint: Option<&Path>,
    on_event: &mut dyn FnMut(&WidEvent),
) -> Result<(Bert, WidSummary)> {
    let started = Instant::now();
    let bert = teacher.bert();
    config.check(&bert.config, pairs.len())?;
    let (train, heldout) = pairs.split_at(pairs.len() - config.holdout);
    let student = match config.method {
        Method::Wid => Student::Wid {
            compactors: Compactors::identity(bert)?,
            removal: None,
        },
        Method::Kd => Student::kd(bert, &config.widths)?,
    };
    let mut run = Run {
        teacher,
        named: student.named(),
        student,
        opt: AdamW::new(),
        train,
        heldout_batches: batches(heldout, config.batch, config.seed),
        heldout,
        config,
        checkpoint,
        on_event,
        step: 0,
        fingerprint: pairs_fingerprint(pairs),
        epoch: None,
    };
    if run.heldout_batches.is_empty() {
        return Err(Error::Config(
            "no held-out batch of distinct passages can be formed from the pairs".into(),
        ));
    }
    if let Some(dir) = checkpoint {
        if checkpoint::exists(dir)? {
            run.restore(dir)?;
        }
    }
    let teacher_heldout = run.heldout_score(&Embedder::Teacher)?;
    (run.on_event)(&WidEvent::Started {
        pairs: train.len(),
        heldout: heldout.len(),
        trainable: run.named.iter().map(|(_, v)| v.elem_count()).sum(),
        start_step: run.step,
    });
    let cadence = Cadence::of_run(
        config.steps,
        config.eval_every,
        config.checkpoint_every,
        checkpoint.is_some(),
    );
    let start = run.step;
    optim::run(&mut run, start, cadence)?;
    let folded = run.student.folded(bert)?;
    let student_heldout = run.heldout_score(&Embedder::Plain(&folded))?;
    let fold_max_error = run.fold_error(&folded)?;
    let summary = WidSummary {
        config: config.clone(),
        pairs: train.len(),
        teacher_parameters: layer_parameters(&bert.config),
        student_parameters: layer_parameters(&folded.config),
        teacher_heldout,
        student_heldout,
        fold_max_error,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((folded, summary))
}

/// The student being trained.
enum Student {
    /// Compactors on the teacher, and the dimensions chosen for removal once chosen.
    Wid {
        compactors: Compactors,
        removal: Option<Removal>,
    },
    /// The truncated teacher's own weights.
    Kd {
        config: BertConfig,
        vars: Vec<(String, Var)>,
    },
}

impl Student {
    fn kd(teacher: &Bert, widths: &Widths) -> Result<Student> {
        let identity = Compactors::identity(teacher)?;
        let start = fold(teacher, &identity, &truncation(&teacher.config, widths))?;
        let mut vars: Vec<(String, Var)> = start
            .tensors()
            .iter()
            .map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?)))
            .collect::<Result<_>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Student::Kd {
            config: start.config.clone(),
            vars,
        })
    }

    fn named(&self) -> NamedVars {
        match self {
            Student::Wid { compactors, .. } => compactors.named(),
            Student::Kd { vars, .. } => vars.clone(),
        }
    }

    fn folded(&self, teacher: &Bert) -> Result<Bert> {
        match self {
            Student::Wid {
                compactors,
                removal,
            } => {
                let removal = removal.as_ref().ok_or_else(|| {
                    Error::Config("the run ended before the dimensions were chosen".into())
                })?;
                fold(teacher, compactors, removal)
            }
            Student::Kd { config, vars } => {
                let tensors = vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect();
                Bert::from_tensors(config.clone(), tensors).map_err(Error::Config)
            }
        }
    }
}

/// Something that embeds texts: the teacher, a plain BERT, or a student's tensors.
enum Embedder<'a> {
    Teacher,
    Plain(&'a Bert),
    Tensors {
        config: &'a BertConfig,
        tensors: HashMap<String, Tensor>,
        norm_weights: Option<Tensor>,
    },
}

/// Token ids and attention mask `[b, t]` of a batch of texts.
struct Tokens {
    ids: Tensor,
    mask: Tensor,
}

/// The queries and the passages of a batch of pairs, tokenized.
struct PairTokens {
    queries: Tokens,
    passages: Tokens,
}

/// A training or evaluation run in progress.
struct Run<'a> {
    teacher: &'a Encoder,
    student: Student,
    named: NamedVars,
    opt: AdamW,
    train: &'a [TextPair],
    heldout: &'a [TextPair],
    heldout_batches: Vec<Vec<usize>>,
    config: &'a WidConfig,
    checkpoint: Option<&'a Path>,
    on_event: &'a mut dyn FnMut(&WidEvent),
    step: usize,
    fingerprint: String,
    epoch: Option<(usize, Vec<Vec<usize>>)>,
}

impl Run<'_> {
    fn state(&self, step: usize) -> WidState {
        WidState {
            step,
            removal: match &self.student {
                Student::Wid { removal, .. } => removal.clone(),
                Student::Kd { .. } => None,
            },
            config: self.config.clone(),
            teacher: self.teacher.sha256.clone(),
            data: self.fingerprint.clone(),
        }
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let saved: WidState = read_json(&dir.join("state.json"))?;
        // Only the cadence may change: the removal schedule depends on the step count too.
        let settings = |c: &WidConfig| WidConfig {
            eval_every: 0,
            checkpoint_every: 0,
            ..c.clone()
        };
        if settings(&saved.config) != settings(self.config)
            || saved.teacher != self.teacher.sha256
            || saved.data != self.fingerprint
        {
            return Err(Error::CheckpointMismatch {
                path: dir.to_path_buf(),
                message: "another teacher, other pairs or other settings (steps included)".into(),
            });
        }
        load_run(dir, &self.saved(), &mut self.opt, saved.step)?;
        if let Student::Wid { removal, .. } = &mut self.student {
            *removal = saved.removal;
        }
        self.step = saved.step;
        Ok(())
    }

    /// What a checkpoint holds: the trained variables and, for WID, the importance scores.
    fn saved(&self) -> NamedVars {
        let mut vars = self.named.clone();
        if let Student::Wid { compactors, .. } = &self.student {
            vars.extend(compactors.importance());
        }
        vars
    }

    /// What is left of the dimensions being removed after `done` steps.
    fn remaining(&self, done: usize) -> f64 {
        let (select, gone) = self.config.removal_steps();
        if done <= select {
            1.0
        } else if done >= gone {
            0.0
        } else {
            1.0 - (done - select) as f64 / (gone - select) as f64
        }
    }

    /// The student as it computes after `done` steps.
    fn embedder(&self, done: usize) -> Result<Embedder<'_>> {
        Ok(match &self.student {
            Student::Wid {
                compactors,
                removal,
            } => {
                let masks = compactors.masks(removal.as_ref(), self.remaining(done))?;
                Embedder::Tensors {
                    config: &self.teacher.bert().config,
                    tensors: compactors.effective(self.teacher.bert(), &masks)?,
                    norm_weights: Some(Compactors::norm_weights(&masks).clone()),
                }
            }
            Student::Kd { config, vars } => Embedder::Tensors {
                config,
                tensors: vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect(),
                norm_weights: None,
            },
        })
    }

    /// Token ids and mask of `texts`, cut to `max_tokens`.
    fn tokenize(&self, texts: &[&str]) -> Result<Tokens> {
        let (ids, mask) = self.teacher.batch(texts)?;
        let t = ids.dim(1)?.min(self.config.max_tokens);
        Ok(Tokens {
            ids: ids.narrow(1, 0, t)?,
            mask: mask.narrow(1, 0, t)?,
        })
    }

    /// The queries and passages of the pairs `batch` of `pairs`, tokenized (once, for every
    /// model that embeds them).
    fn tokenize_pairs(&self, pairs: &[TextPair], batch: &[usize]) -> Result<PairTokens> {
        let queries: Vec<&str> = batch.iter().map(|&i| pairs[i].query.as_str()).collect();
        let passages: Vec<&str> = batch.iter().map(|&i| pairs[i].passage.as_str()).collect();
        Ok(PairTokens {
            queries: self.tokenize(&queries)?,
            passages: self.tokenize(&passages)?,
        })
    }

    /// Unit embeddings `[n, dim]` of tokenized texts.
    fn embed(&self, by: &Embedder, t: &Tokens) -> Result<Tensor> {
        let hidden = match by {
            Embedder::Teacher => self.teacher.bert().forward(&t.ids, &t.mask)?,
            Embedder::Plain(bert) => bert.forward(&t.ids, &t.mask)?,
            Embedder::Tensors {
                config,
                tensors,
                norm_weights,
            } => forward_with(config, tensors, norm_weights.as_ref(), &t.ids, &t.mask)?,
        };
        Ok(mean_pool_normalized(&hidden, &t.mask)?)
    }

    /// Query and passage embeddings of tokenized pairs.
    fn embed_pairs(&self, by: &Embedder, t: &PairTokens) -> Result<(Tensor, Tensor)> {
        Ok((self.embed(by, &t.queries)?, self.embed(by, &t.passages)?))
    }

    fn heldout_score(&self, by: &Embedder) -> Result<Heldout> {
        let (mut loss, mut hits, mut n) = (0.0, 0usize, 0usize);
        for batch in &self.heldout_batches {
            let (q, p) = self.embed_pairs(by, &self.tokenize_pairs(self.heldout, batch)?)?;
            loss += contrastive(&q, &p, self.config.scale)?.to_scalar::<f32>()? as f64
                * batch.len() as f64;
            let best: Vec<u32> = q.matmul(&p.t()?)?.argmax(1)?.to_vec1()?;
            hits += best
                .iter()
                .enumerate()
                .filter(|(i, &j)| *i == j as usize)
                .count();
            n += batch.len();
        }
        Ok(Heldout {
            loss: loss / n.max(1) as f64,
            top1: hits as f64 / n.max(1) as f64,
        })
    }

    /// The largest difference between the embeddings of the first held-out batch by the
    /// student as trained and by `folded`.
    fn fold_error(&self, folded: &Bert) -> Result<f64> {
        let tokens = self.tokenize_pairs(self.heldout, &self.heldout_batches[0])?;
        let (q, p) = self.embed_pairs(&self.embedder(self.config.steps)?, &tokens)?;
        let (fq, fp) = self.embed_pairs(&Embedder::Plain(folded), &tokens)?;
        // Before folding, removed hidden dimensions are (exact) zeros among the kept ones.
        let (q, p) = match &self.student {
            Student::Wid {
                removal: Some(r), ..
            } => {
                let kept = student::kept(q.dim(1)?, &r.hidden)?;
                (q.index_select(&kept, 1)?, p.index_select(&kept, 1)?)
            }
            _ => (q, p),
        };
        let gap = Tensor::cat(&[(q - fq)?, (p - fp)?], 0)?.abs()?.max_all()?;
        Ok(gap.to_scalar::<f32>()? as f64)
    }

    /// The pairs of optimizer step `step`: epoch `step / n` in that epoch's order (the
    /// epoch's batches are kept until the next one).
    fn batch_of_step(&mut self, step: usize) -> Result<Vec<usize>> {
        let per_epoch = (self.train.len() / self.config.batch).max(1);
        let epoch = step / per_epoch;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let seed = self.config.seed.wrapping_add(epoch as u64);
            self.epoch = Some((epoch, batches(self.train, self.config.batch, seed)));
        }
        let list = &self.epoch.as_ref().expect("set above").1;
        if list.is_empty() {
            return Err(Error::Config(
                "no full batch of distinct passages can be formed from the pairs".into(),
            ));
        }
        Ok(list[(step % per_epoch) % list.len()].clone())
    }

    /// The loss of one batch: contrastive for WID (plus the penalty before selection),
    /// similarity matching for the baseline.
    fn loss(&self, step: usize, batch: &[usize]) -> Result<(Tensor, usize)> {
        let by = self.embedder(step)?;
        let t = self.tokenize_pairs(self.train, batch)?;
        let tokens =
            (t.queries.mask.sum_all()? + t.passages.mask.sum_all()?)?.to_scalar::<f32>()? as usize;
        let (q, p) = self.embed_pairs(&by, &t)?;
        match &self.student {
            Student::Wid {
                compactors,
                removal,
            } => {
                let mut task = contrastive(&q, &p, self.config.scale)?;
                if self.config.soft_labels > 0.0 {
                    let (tq, tp) = self.embed_pairs(&Embedder::Teacher, &t)?;
                    let soft = soft_contrastive(&q, &p, &tq, &tp, self.config.scale)?;
                    task = (task + (soft * self.config.soft_labels)?)?;
                }
                let loss = match removal {
                    None => (task + (compactors.penalty()? * self.config.penalty)?)?,
                    Some(_) => task,
                };
                Ok((loss, tokens))
            }
            Student::Kd { .. } => {
                let (tq, tp) = self.embed_pairs(&Embedder::Teacher, &t)?;
                let s = Tensor::cat(&[&q, &p], 0)?;
                let t = Tensor::cat(&[&tq, &tp], 0)?;
                let gap = (s.matmul(&s.t()?)? - t.matmul(&t.t()?)?)?;
                Ok((gap.sqr()?.mean_all()?, tokens))
            }
        }
    }
}

impl Trainer for Run<'_> {
    fn step(&mut self, step: usize) -> Result<()> {
        let t0 = Instant::now();
        let batch = self.batch_of_step(step)?;
        let (loss, tokens) = self.loss(step, &batch)?;
        let grads = loss.backward()?;
        let schedule = optim::Schedule {
            lr: self.config.lr,
            warmup: self.config.warmup,
            steps: self.config.steps,
            min_ratio: 0.1,
        };
        let grads = grads_of(&grads, &self.named);
        if let Student::Wid {
            compactors,
            removal: None,
        } = &self.student
        {
            compactors.accumulate(&grads)?;
        }
        // The shared hidden compactor acts on every matrix at once: its own rate.
        let hidden_lr = self.config.hidden_lr;
        let scale = move |name: &str| if name == "hidden" { hidden_lr } else { 1.0 };
        self.opt
            .step_scaled(&self.named, &grads, schedule.lr_at(step), 0.0, &scale)?;
        self.step = step + 1;
        let (select, _) = self.config.removal_steps();
        if let Student::Wid {
            compactors,
            removal,
        } = &mut self.student
        {
            if removal.is_none() && self.step >= select {
                let chosen = compactors.select(&self.config.widths)?;
                (self.on_event)(&WidEvent::Selected(chosen.clone()));
                *removal = Some(chosen);
            }
        }
        let remaining = self.remaining(self.step);
        (self.on_event)(&WidEvent::Step {
            step: self.step,
            loss: loss.to_scalar::<f32>()? as f64,
            remaining,
            tokens_per_sec: tokens as f64 / t0.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn evaluate(&mut self, done: usize) -> Result<()> {
        let by = self.embedder(done)?;
        let score = self.heldout_score(&by)?;
        (self.on_event)(&WidEvent::Heldout { step: done, score });
        Ok(())
    }

    fn checkpoint(&mut self, done: usize) -> Result<()> {
        match self.checkpoint {
            Some(dir) => save_run(dir, &self.state(done), &self.saved(), &self.opt),
            None => Ok(()),
        }
    }
}

/// In-batch contrastive loss: cross-entropy of each query's scaled cosines over the batch's
/// passages, its own passage the target.
fn contrastive(q: &Tensor, p: &Tensor, scale: f64) -> Result<Tensor> {
    let logits = (q.matmul(&p.t()?)? * scale)?;
    let n = q.dim(0)?;
    let targets = Tensor::arange(0u32, n as u32, q.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

/// The teacher's in-batch ranking as soft labels: KL divergence from the teacher's softmax
/// over each query's passages (its scaled cosines) to the student's.
pub(super) fn soft_contrastive(
    q: &Tensor,
    p: &Tensor,
    tq: &Tensor,
    tp: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let student = candle_nn::ops::log_softmax(&(q.matmul(&p.t()?)? * scale)?, 1)?;
    let teacher = candle_nn::ops::log_softmax(&(tq.matmul(&tp.t()?)? * scale)?, 1)?;
    let kl = (teacher.exp()? * (&teacher - &student)?)?
        .sum(1)?
        .mean_all()?;
    Ok(kl)
}

/// The batches of one pass over `pairs` in the order of `seed`: full batches in which no
/// passage and no query appears twice (a repeated passage would be its own negative).
pub(super) fn batches(pairs: &[TextPair], batch: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut remaining = crate::data::shuffled(pairs.len(), seed);
    let mut out = Vec::new();
    loop {
        let (mut current, mut rest) = (Vec::new(), Vec::new());
        let (mut passages, mut queries) = (HashSet::new(), HashSet::new());
        for i in remaining {
            let p = &pairs[i];
            if current.len() < batch
                && !passages.contains(&p.passage_id)
                && !queries.contains(&p.query)
            {
                passages.insert(p.passage_id.clone());
                queries.insert(p.query.clone());
                current.push(i);
            } else {
                rest.push(i);
            }
        }
        if current.len() < batch {
            return out;
        }
        out.push(current);
        remaining = rest;
    }
}

/// A fingerprint of the pairs (queries and passage ids), so a resume on other data is refused.
fn pairs_fingerprint(pairs: &[TextPair]) -> String {
    let rows: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| {
            p.query
                .bytes()
                .chain([0])
                .chain(p.passage_id.bytes())
                .map(u32::from)
                .collect()
        })
        .collect();
    optim::fingerprint(rows.iter().map(|r| r.as_slice()), None)
}
