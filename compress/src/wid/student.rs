//! The WID student: the teacher's frozen weights seen through trainable compactors, and the
//! folding of compactors into a smaller BERT.
//!
//! Every linear map `W` of the teacher becomes `Rᵀ·W·C` in the student, where the column
//! compactor `C` and the row compactor `R` are square matrices (identity at the start, so the
//! student starts as the teacher) scaled column-wise by removal masks:
//! - one hidden compactor `H` (shared by the embeddings and every layer, so the residual
//!   stream stays one space): `C` of the maps that read the stream (query, key, value,
//!   intermediate), `R` of those that write it (attention output, MLP output) and of the
//!   embeddings;
//! - per layer, a query–key compactor `A` (one block per head, `C` of both, so `q·k` is
//!   `q·A·Aᵀ·k`), a value–output compactor `G` (per head; `R` of value, `C` of the attention
//!   output) and an MLP compactor `F` (`R` of intermediate, `C` of the MLP output).
//!
//! A dimension being removed has its compactor column scaled by a factor that falls to 0;
//! the LayerNorms weigh their statistics by the hidden masks. At 0 the removed dimensions
//! carry exact zeros, so slicing them away ([`fold`]) changes nothing but rounding.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use geek_retriever::dense::{Bert, BertConfig};
use serde::{Deserialize, Serialize};

use crate::optim::NamedVars;
use crate::{Error, Result};

/// The widths a student is compressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Widths {
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads kept per layer.
    pub heads: usize,
    /// Width of each kept head.
    pub head: usize,
    /// MLP width.
    pub ffn: usize,
}

impl Widths {
    /// The widths of `config` (nothing removed).
    pub fn of(config: &BertConfig) -> Widths {
        Widths {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            head: config.head_size(),
            ffn: config.intermediate_size,
        }
    }

    /// Whether a model of `config` can shrink to these widths.
    pub fn check(&self, config: &BertConfig) -> Result<()> {
        let full = Widths::of(config);
        let fits = |w: usize, f: usize| w >= 1 && w <= f;
        if fits(self.hidden, full.hidden)
            && fits(self.heads, full.heads)
            && fits(self.head, full.head)
            && fits(self.ffn, full.ffn)
        {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "widths {self:?} do not fit in the teacher's {full:?} (each between 1 and the teacher's)"
            )))
        }
    }

    /// The shape of a BERT of these widths, otherwise as `teacher`.
    pub fn config(&self, teacher: &BertConfig) -> BertConfig {
        BertConfig {
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_attention_heads: self.heads,
            attention_head_size: Some(self.head),
            ..teacher.clone()
        }
    }
}

/// Hidden size, heads, head width and MLP width of `config`.
fn dims(config: &BertConfig) -> (usize, usize, usize, usize) {
    (
        config.hidden_size,
        config.num_attention_heads,
        config.head_size(),
        config.intermediate_size,
    )
}

/// Non-embedding parameters (weights and biases of the layers, LayerNorms included) of a
/// BERT of `config`.
pub fn layer_parameters(config: &BertConfig) -> usize {
    let (d, a, f) = (
        config.hidden_size,
        config.num_attention_heads * config.head_size(),
        config.intermediate_size,
    );
    let per_layer = 3 * (d * a + a) + (a * d + d) + (d * f + f) + (f * d + d) + 4 * d;
    per_layer * config.num_hidden_layers
}

/// The dimensions chosen for removal: hidden indices, and per layer query–key and value
/// indices (`head · head_size + j`: every dimension of a removed head, and the same count of
/// every kept head; query–key and value keep the same heads) and MLP channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// Hidden dimensions.
    pub hidden: Vec<usize>,
    /// Per layer, query–key dimensions.
    pub qk: Vec<Vec<usize>>,
    /// Per layer, value dimensions.
    pub vo: Vec<Vec<usize>>,
    /// Per layer, MLP channels.
    pub ffn: Vec<Vec<usize>>,
}

/// The removal masks at one moment: 1 on kept dimensions, the remaining factor on removed ones.
pub(crate) struct Masks {
    hidden: Tensor,
    qk: Vec<Tensor>,
    vo: Vec<Tensor>,
    ffn: Vec<Tensor>,
}

/// A mask of `n` ones with `factor` at `removed`.
fn mask(n: usize, removed: &[usize], factor: f64) -> Result<Tensor> {
    let mut v = vec![1f32; n];
    for &i in removed {
        v[i] = factor as f32;
    }
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

/// Indices of `0..n` not in `removed`, ascending, as a u32 tensor.
pub(crate) fn kept(n: usize, removed: &[usize]) -> Result<Tensor> {
    let gone: std::collections::HashSet<usize> = removed.iter().copied().collect();
    let v: Vec<u32> = (0..n)
        .filter(|i| !gone.contains(i))
        .map(|i| i as u32)
        .collect();
    let len = v.len();
    Ok(Tensor::from_vec(v, len, &Device::Cpu)?)
}

/// The `count` positions of the smallest values of `norms`.
fn smallest(norms: &[f32], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..norms.len()).collect();
    order.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]).then(a.cmp(&b)));
    let mut out: Vec<usize> = order.into_iter().take(count).collect();
    out.sort_unstable();
    out
}

/// The trainable part of a WID student: its compactors and LayerNorms.
pub(crate) struct Compactors {
    config: BertConfig,
    hidden: Var,
    qk: Vec<Var>,
    vo: Vec<Var>,
    ffn: Vec<Var>,
    norms: Vec<(String, Var, Var)>,
    importance: NamedVars,
}

/// Names of the LayerNorms of a BERT of `layers` layers.
pub(crate) fn norm_names(layers: usize) -> Vec<String> {
    let mut names = vec!["embeddings.LayerNorm".to_string()];
    for i in 0..layers {
        names.push(format!("encoder.layer.{i}.attention.output.LayerNorm"));
        names.push(format!("encoder.layer.{i}.output.LayerNorm"));
    }
    names
}

fn tensor<'a>(teacher: &'a Bert, name: &str) -> Result<&'a Tensor> {
    teacher
        .tensors()
        .get(name)
        .ok_or_else(|| Error::Config(format!("the teacher has no tensor {name}")))
}

impl Compactors {
    /// Identity compactors and the teacher's LayerNorms: the student is the teacher.
    pub(crate) fn identity(teacher: &Bert) -> Result<Compactors> {
        let c = &teacher.config;
        let (d, nh, hs, f) = dims(c);
        let eye = |n: usize| Tensor::eye(n, DType::F32, &Device::Cpu);
        let heads = || -> Result<Var> {
            Ok(Var::from_tensor(
                &eye(hs)?.unsqueeze(0)?.repeat((nh, 1, 1))?,
            )?)
        };
        let layers = c.num_hidden_layers;
        let mut norms = Vec::new();
        for name in norm_names(layers) {
            let w = Var::from_tensor(tensor(teacher, &format!("{name}.weight"))?)?;
            let b = Var::from_tensor(tensor(teacher, &format!("{name}.bias"))?)?;
            norms.push((name, w, b));
        }
        let mut compactors = Compactors {
            config: c.clone(),
            hidden: Var::from_tensor(&eye(d)?)?,
            qk: (0..layers).map(|_| heads()).collect::<Result<_>>()?,
            vo: (0..layers).map(|_| heads()).collect::<Result<_>>()?,
            ffn: (0..layers)
                .map(|_| Ok(Var::from_tensor(&eye(f)?)?))
                .collect::<Result<_>>()?,
            norms,
            importance: Vec::new(),
        };
        compactors.importance = compactors
            .compactors()
            .into_iter()
            .map(|(name, v)| {
                let columns = v.as_tensor().sum(D::Minus2)?.zeros_like()?;
                Ok((format!("importance.{name}"), Var::from_tensor(&columns)?))
            })
            .collect::<Result<_>>()?;
        Ok(compactors)
    }

    /// The variables by name (for the optimizer and checkpoints).
    pub(crate) fn named(&self) -> NamedVars {
        let mut out: NamedVars = self
            .compactors()
            .into_iter()
            .map(|(n, v)| (n, v.clone()))
            .collect();
        for (name, w, b) in &self.norms {
            out.push((format!("{name}.weight"), w.clone()));
            out.push((format!("{name}.bias"), b.clone()));
        }
        out
    }

    /// The group-lasso penalty: the sum of the L2 norms of every compactor column, divided by
    /// the number of columns (so its weight does not depend on the model's size).
    pub(crate) fn penalty(&self) -> Result<Tensor> {
        let mut total = self.hidden.as_tensor().sqr()?.sum(0)?.sqrt()?.sum_all()?;
        let mut columns = self.config.hidden_size;
        for v in self.qk.iter().chain(&self.vo).chain(&self.ffn) {
            let t = v.as_tensor();
            let norms = t.sqr()?.sum(D::Minus2)?.sqrt()?;
            columns += norms.elem_count();
            total = (total + norms.sum_all()?)?;
        }
        Ok((total / columns as f64)?)
    }

    /// The compactors by name (the importance scores use the same names).
    fn compactors(&self) -> Vec<(String, &Var)> {
        let mut out = vec![("hidden".to_string(), &self.hidden)];
        for (i, ((qk, vo), ffn)) in self.qk.iter().zip(&self.vo).zip(&self.ffn).enumerate() {
            out.push((format!("qk.{i}"), qk));
            out.push((format!("vo.{i}"), vo));
            out.push((format!("ffn.{i}"), ffn));
        }
        out
    }

    /// Adds this step's first-order importance of every compactor column to the running
    /// scores: `|Σᵢ gᵢⱼ·cᵢⱼ|`, the loss change a removal of column `j` would cause to first
    /// order, with `g` the gradients of the step by compactor name.
    pub(crate) fn accumulate(&self, grads: &HashMap<String, Tensor>) -> Result<()> {
        for ((name, var), (_, score)) in self.compactors().into_iter().zip(&self.importance) {
            if let Some(g) = grads.get(&name) {
                let step = (g * var.as_tensor())?.sum(D::Minus2)?.abs()?;
                score.set(&(score.as_tensor() + step)?)?;
            }
        }
        Ok(())
    }

    /// The running importance scores by name (saved with checkpoints; not trained).
    pub(crate) fn importance(&self) -> NamedVars {
        self.importance.clone()
    }

    /// The dimensions to remove to reach `widths`: in every compactor, the columns of least
    /// accumulated importance (for attention, the least important heads whole, then the
    /// same number of dimensions in each kept head).
    pub(crate) fn select(&self, widths: &Widths) -> Result<Removal> {
        let c = &self.config;
        let (d, nh, hs, f) = dims(c);
        let scores: Vec<Vec<f32>> = self
            .importance
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1()?))
            .collect::<Result<_>>()?;
        // Per layer: the heads of least importance (query-key and value-output columns
        // together) go whole; within the others, the least important dimensions.
        let attention = |qk: &Vec<f32>, vo: &Vec<f32>| -> (Vec<usize>, Vec<usize>) {
            let head_score: Vec<f32> = (0..nh)
                .map(|h| (h * hs..(h + 1) * hs).map(|j| qk[j] + vo[j]).sum())
                .collect();
            let gone = smallest(&head_score, nh - widths.heads);
            let within = |s: &Vec<f32>| -> Vec<usize> {
                (0..nh)
                    .flat_map(|h| {
                        let dims = if gone.contains(&h) {
                            (0..hs).collect()
                        } else {
                            smallest(&s[h * hs..(h + 1) * hs], hs - widths.head)
                        };
                        dims.into_iter().map(move |j| h * hs + j)
                    })
                    .collect()
            };
            (within(qk), within(vo))
        };
        let layer = |i: usize, k: usize| &scores[1 + 3 * i + k];
        let layers = c.num_hidden_layers;
        let heads: Vec<(Vec<usize>, Vec<usize>)> = (0..layers)
            .map(|i| attention(layer(i, 0), layer(i, 1)))
            .collect();
        Ok(Removal {
            hidden: smallest(&scores[0], d - widths.hidden),
            qk: heads.iter().map(|(qk, _)| qk.clone()).collect(),
            vo: heads.into_iter().map(|(_, vo)| vo).collect(),
            ffn: (0..layers)
                .map(|i| smallest(layer(i, 2), f - widths.ffn))
                .collect(),
        })
    }

    /// The masks of `removal` with `factor` left of the removed dimensions (none: all ones).
    pub(crate) fn masks(&self, removal: Option<&Removal>, factor: f64) -> Result<Masks> {
        let c = &self.config;
        let (d, a, f) = (
            c.hidden_size,
            c.num_attention_heads * c.head_size(),
            c.intermediate_size,
        );
        let layers = c.num_hidden_layers;
        let empty = vec![Vec::new(); layers];
        let (hidden, qk, vo, ffn) = match removal {
            Some(r) => (&r.hidden[..], &r.qk, &r.vo, &r.ffn),
            None => (&[][..], &empty, &empty, &empty),
        };
        Ok(Masks {
            hidden: mask(d, hidden, factor)?,
            qk: qk
                .iter()
                .map(|r| mask(a, r, factor))
                .collect::<Result<_>>()?,
            vo: vo
                .iter()
                .map(|r| mask(a, r, factor))
                .collect::<Result<_>>()?,
            ffn: ffn
                .iter()
                .map(|r| mask(f, r, factor))
                .collect::<Result<_>>()?,
        })
    }

    /// The student's tensors (Hugging Face names, the teacher's shapes) under `masks`, and the
    /// LayerNorm weights; differentiable in the compactors.
    pub(crate) fn effective(
        &self,
        teacher: &Bert,
        masks: &Masks,
    ) -> Result<HashMap<String, Tensor>> {
        let c = &self.config;
        let (nh, hs) = (c.num_attention_heads, c.head_size());
        let hm = &masks.hidden;
        // Ĥ = H·diag(m): the hidden compactor with its removal mask.
        let h = self.hidden.as_tensor().broadcast_mul(&hm.unsqueeze(0)?)?;
        let read = |w: &Tensor| w.matmul(&h);
        let write = |w: &Tensor| h.t()?.matmul(w);
        let through = |b: &Tensor, m: &Tensor| b.unsqueeze(0)?.matmul(m)?.squeeze(0);
        let mut out = HashMap::new();
        for name in [
            "word_embeddings",
            "position_embeddings",
            "token_type_embeddings",
        ] {
            let key = format!("embeddings.{name}.weight");
            out.insert(key.clone(), read(tensor(teacher, &key)?)?);
        }
        for (name, w, b) in &self.norms {
            out.insert(format!("{name}.weight"), w.as_tensor().broadcast_mul(hm)?);
            out.insert(format!("{name}.bias"), b.as_tensor().broadcast_mul(hm)?);
        }
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let w = |n: &str| tensor(teacher, &format!("{p}.{n}.weight"));
            let b = |n: &str| tensor(teacher, &format!("{p}.{n}.bias"));
            let (qk, qkm) = (self.qk[i].as_tensor(), &masks.qk[i]);
            let (vo, vom) = (self.vo[i].as_tensor(), &masks.vo[i]);
            for (n, comp, m) in [("query", qk, qkm), ("key", qk, qkm), ("value", vo, vom)] {
                let name = format!("attention.self.{n}");
                let rows = read(w(&name)?)?;
                out.insert(
                    format!("{p}.{name}.weight"),
                    head_rows(&rows, comp, m, nh, hs)?,
                );
                let bias = head_rows(&b(&name)?.unsqueeze(1)?, comp, m, nh, hs)?.squeeze(1)?;
                out.insert(format!("{p}.{name}.bias"), bias);
            }
            let o = head_columns(w("attention.output.dense")?, vo, vom, nh, hs)?;
            out.insert(format!("{p}.attention.output.dense.weight"), write(&o)?);
            let ob = through(b("attention.output.dense")?, &h)?;
            out.insert(format!("{p}.attention.output.dense.bias"), ob);
            let (fc, fm) = (self.ffn[i].as_tensor(), &masks.ffn[i]);
            let inner = fc.t()?.matmul(&read(w("intermediate.dense")?)?)?;
            let inner = inner.broadcast_mul(&fm.unsqueeze(1)?)?;
            out.insert(format!("{p}.intermediate.dense.weight"), inner);
            let ib = through(b("intermediate.dense")?, fc)?.broadcast_mul(fm)?;
            out.insert(format!("{p}.intermediate.dense.bias"), ib);
            let down = w("output.dense")?
                .matmul(fc)?
                .broadcast_mul(&fm.unsqueeze(0)?)?;
            out.insert(format!("{p}.output.dense.weight"), write(&down)?);
            out.insert(
                format!("{p}.output.dense.bias"),
                through(b("output.dense")?, &h)?,
            );
        }
        Ok(out)
    }

    /// The hidden masks the LayerNorms weigh their statistics by.
    pub(crate) fn norm_weights(masks: &Masks) -> &Tensor {
        &masks.hidden
    }
}

/// `diag(m)·Aᵀ·W` per head: rows `[nh·hs, n]` of `w` mixed by the head blocks `a`
/// `[nh, hs, hs]` and scaled by `m` `[nh·hs]`.
fn head_rows(w: &Tensor, a: &Tensor, m: &Tensor, nh: usize, hs: usize) -> Result<Tensor> {
    let n = w.dim(1)?;
    let mixed = a.transpose(1, 2)?.matmul(&w.reshape((nh, hs, n))?)?;
    Ok(mixed
        .broadcast_mul(&m.reshape((nh, hs, 1))?)?
        .reshape((nh * hs, n))?)
}

/// `W·A·diag(m)` per head: columns `[n, nh·hs]` of `w` mixed by the head blocks `a`.
fn head_columns(w: &Tensor, a: &Tensor, m: &Tensor, nh: usize, hs: usize) -> Result<Tensor> {
    let n = w.dim(0)?;
    let per_head = w.reshape((n, nh, hs))?.transpose(0, 1)?.contiguous()?;
    let mixed = per_head
        .matmul(a)?
        .broadcast_mul(&m.reshape((nh, 1, hs))?)?;
    Ok(mixed.transpose(0, 1)?.contiguous()?.reshape((n, nh * hs))?)
}

/// The smaller BERT the student is once `removal` is complete: the effective tensors with the
/// removed dimensions sliced away, query weights rescaled for the narrower heads' softmax
/// temperature (`1/√head`).
pub(crate) fn fold(teacher: &Bert, compactors: &Compactors, removal: &Removal) -> Result<Bert> {
    let c = &teacher.config;
    let (d, nh, hs, f) = dims(c);
    let a = nh * hs;
    let tensors = compactors.effective(teacher, &compactors.masks(Some(removal), 0.0)?)?;
    let hidden = kept(d, &removal.hidden)?;
    let widths = Widths {
        hidden: hidden.elem_count(),
        ffn: f - removal.ffn.first().map_or(0, |r| r.len()),
        ..attention_widths(removal, nh, hs)?
    };
    let scale = (widths.head as f64 / hs as f64).sqrt();
    let mut out = HashMap::new();
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| Error::Config(format!("no student tensor {name}")))
    };
    for name in [
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    ] {
        let key = format!("embeddings.{name}.weight");
        out.insert(key.clone(), get(&key)?.index_select(&hidden, 1)?);
    }
    for name in norm_names(c.num_hidden_layers) {
        for part in ["weight", "bias"] {
            let key = format!("{name}.{part}");
            out.insert(key.clone(), get(&key)?.index_select(&hidden, 0)?);
        }
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let qk = kept(a, &removal.qk[i])?;
        let vo = kept(a, &removal.vo[i])?;
        let ffn = kept(f, &removal.ffn[i])?;
        for (n, rows, k) in [
            ("query", &qk, scale),
            ("key", &qk, 1.0),
            ("value", &vo, 1.0),
        ] {
            let name = format!("{p}.attention.self.{n}");
            let w = get(&format!("{name}.weight"))?.index_select(rows, 0)?;
            out.insert(format!("{name}.weight"), (w.index_select(&hidden, 1)? * k)?);
            let b = get(&format!("{name}.bias"))?.index_select(rows, 0)?;
            out.insert(format!("{name}.bias"), (b * k)?);
        }
        let slice = |name: &str, rows: &Tensor, cols: &Tensor, out: &mut HashMap<_, _>| {
            let w = get(&format!("{p}.{name}.weight"))?.index_select(rows, 0)?;
            out.insert(format!("{p}.{name}.weight"), w.index_select(cols, 1)?);
            let b = get(&format!("{p}.{name}.bias"))?.index_select(rows, 0)?;
            out.insert(format!("{p}.{name}.bias"), b);
            Ok::<_, Error>(())
        };
        slice("attention.output.dense", &hidden, &vo, &mut out)?;
        slice("intermediate.dense", &ffn, &hidden, &mut out)?;
        slice("output.dense", &hidden, &ffn, &mut out)?;
    }
    let tensors = out
        .into_iter()
        .map(|(k, v)| Ok((k, v.contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Bert::from_tensors(widths.config(c), tensors).map_err(Error::Config)
}

/// The heads and head width `removal` leaves, the same in every layer for query-key and
/// value (what one BERT configuration can hold).
fn attention_widths(removal: &Removal, nh: usize, hs: usize) -> Result<Widths> {
    // The heads a removal keeps, and their width if it is one for all.
    let shape = |removed: &Vec<usize>| {
        let gone: std::collections::HashSet<usize> = removed.iter().copied().collect();
        let kept = |h: usize| (0..hs).filter(|j| !gone.contains(&(h * hs + j))).count();
        let heads: Vec<usize> = (0..nh).filter(|&h| kept(h) > 0).collect();
        let head = heads.first().map_or(0, |&h| kept(h));
        (head > 0 && heads.iter().all(|&h| kept(h) == head)).then_some((heads, head))
    };
    let mut found: Option<(usize, usize)> = None;
    for (qk, vo) in removal.qk.iter().zip(&removal.vo) {
        let (q, v) = (shape(qk), shape(vo));
        let layer = match (q, v) {
            (Some(q), Some(v)) if q == v => Some((q.0.len(), q.1)),
            _ => None,
        };
        if layer.is_none() || (found.is_some() && found != layer) {
            return Err(Error::Config(
                "a removal must keep the same heads for query-key and value in a layer, as many \
                 and each as wide in every layer"
                    .into(),
            ));
        }
        found = layer;
    }
    let (heads, head) = found.unwrap_or((nh, hs));
    Ok(Widths {
        hidden: 0,
        heads,
        head,
        ffn: 0,
    })
}

/// The student of `truncated` widths that keeps the first dimensions of every group (the
/// first heads, the first dimensions of each: the plain-distillation baseline's start).
pub(crate) fn truncation(config: &BertConfig, widths: &Widths) -> Removal {
    let (nh, hs) = (config.num_attention_heads, config.head_size());
    let heads: Vec<usize> = (0..nh)
        .flat_map(|h| {
            let from = if h < widths.heads { widths.head } else { 0 };
            (from..hs).map(move |j| h * hs + j)
        })
        .collect();
    let layers = config.num_hidden_layers;
    Removal {
        hidden: (widths.hidden..config.hidden_size).collect(),
        qk: vec![heads.clone(); layers],
        vo: vec![heads; layers],
        ffn: vec![(widths.ffn..config.intermediate_size).collect(); layers],
    }
}
