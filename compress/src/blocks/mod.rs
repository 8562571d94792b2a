//! GGUF block types as `d·q + m` grids, their learnable scales, and the fake-quantization op.
//!
//! Every block of `width` consecutive weights in a row stores a scale `d` (f16), for some types
//! an offset `m` (f16), and integer codes `q` in `[qmin, qmax]`; the weight it stands for is
//! `d·q + m`. Following QuantGPT (Tao et al., ACL 2022), the scale is not learned directly but
//! through the clipping threshold `α = γ·mean|w|`: a learnable factor γ per group (block, row
//! or whole module) times the group's mean magnitude, with `d = s·α / levels` (`levels` = 8
//! for Q4_0, 128 for Q8_0, 15 for Q4_1's range, …; `s` the sign of the block's
//! round-to-nearest scale). γ is then of the same size for every type, so one learning rate
//! fits all. Offsets (Q4_1, Q2_K) are `m = β·mean|w|` per block.
//!
//! [`FakeQuant`] computes `d·q + m` from `w`, γ and β in the forward pass with f16-rounded
//! `d` and `m` (exactly what the file will hold) and, in the backward pass, the
//! straight-through gradients of LSQ: inside the grid `∂ŵ/∂w = 1`, `∂ŵ/∂d = q − (w−m)/d`;
//! clipped, `∂ŵ/∂w = 0`, `∂ŵ/∂d = q`, `∂ŵ/∂m = 1`. With trainable weights (QAT) the gradient
//! also flows through `mean|w|` as QuantGPT's does.

use std::borrow::Cow;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::fused::slice_of;
use crate::quantize::QuantType;
use crate::{Error, Result};

mod layout;
use layout::{read_super_blocks, write_block, SuperParams};

/// Which weights share one learnable scale factor γ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One γ per block (each block's `d` is free).
    Block,
    /// One γ per row: every block of a row has the same `d`.
    Row,
    /// One γ per matrix, QuantGPT's module-wise scaling.
    Module,
}

impl Granularity {
    /// Parses `block`, `row` or `module`.
    pub fn from_name(name: &str) -> Result<Granularity> {
        match name {
            "block" => Ok(Granularity::Block),
            "row" => Ok(Granularity::Row),
            "module" => Ok(Granularity::Module),
            other => Err(Error::Config(format!(
                "unknown granularity `{other}` (block, row or module)"
            ))),
        }
    }
}

/// How the first scales are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleInit {
    /// ggml's round-to-nearest scales (max magnitude on the grid's end).
    Rtn,
    /// Per block, the candidate scale (or range) with the least squared weight error.
    Mse,
    /// Per block, the candidate with the least squared error weighted by how much each
    /// weight's input column carries: the mean squared activation entering the layer on
    /// calibration text ([`crate::importance`]), times `sqrt(σ² + w²)` as llama.cpp weighs
    /// its importance matrix (σ² twice the block's mean squared weight).
    Imatrix,
    /// ggml's reference quantizer's own blocks (what the round-to-nearest file holds): for
    /// the k-quants, each block's scale and minimum read back from ggml's encoding of the
    /// weights, whose search differs from [`ScaleInit::Rtn`]'s; the other types as `Rtn`.
    Ggml,
}

/// How much each weight's squared error counts in its block's search: llama.cpp's weighting
/// of an importance matrix, `a_j · sqrt(σ² + x_j²)`, with `a_j` the input column's mean
/// squared activation and σ² twice the block's mean squared weight.
fn error_weights(x: &[f32], importance: &[f32]) -> Vec<f32> {
    let sigma2 = 2.0 * x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    x.iter()
        .zip(importance)
        .map(|(v, a)| a * (sigma2 + v * v).sqrt())
        .collect()
}

/// The first parameters of every `format.width`-long block of `data` (rows of
/// `importance.len()` columns when an importance is given), the blocks shared out among the
/// machine's cores (each block's search is independent: the result is the same as one
/// thread's).
fn block_inits(
    format: BlockFormat,
    data: &[f32],
    how: ScaleInit,
    importance: Option<&[f32]>,
) -> Vec<(f32, f32)> {
    let blocks = data.len().div_ceil(format.width);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = blocks.div_ceil(threads).max(1) * format.width;
    let search = move |start: usize, block: &[f32]| match importance {
        Some(a) => {
            let col = start % a.len();
            let weights = error_weights(block, &a[col..col + block.len()]);
            format.init(block, how, Some(&weights))
        }
        None => format.init(block, how, None),
    };
    std::thread::scope(|scope| {
        let parts: Vec<_> = data
            .chunks(per_thread)
            .enumerate()
            .map(|(p, part)| {
                scope.spawn(move || {
                    part.chunks(format.width)
                        .enumerate()
                        .map(|(b, block)| search(p * per_thread + b * format.width, block))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().expect("a block's scale search panicked"))
            .collect()
    })
}

/// A block type seen as a `d·q + m` grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockFormat {
    /// The GGUF type written.
    pub ty: QuantType,
    /// Weights per block.
    pub width: usize,
    /// Smallest code.
    pub qmin: i32,
    /// Largest code.
    pub qmax: i32,
    /// Whether blocks carry an offset `m`.
    pub offset: bool,
    /// Blocks per super-block whose scales and minimums are themselves quantized to 6 bits
    /// against the super-block's f16 `d` and `dmin` (Q4_K: 8 blocks of 32); 1 for the types
    /// whose blocks store f16 parameters directly.
    pub sub_blocks: usize,
}

/// The scale and offset of one block as the file's dequantization computes them: f16 values,
/// or for k-quants the super-block's f16 scale times the block's 6-bit one.
type BlockParams = (f32, f32);

impl BlockFormat {
    /// The grid of `ty`. The k-quants keep their real layouts: a learned scale (Q4_K, Q2_K:
    /// and offset) per block of 32 (Q4_K) or 16 weights (Q3_K, Q2_K), stored as 6-bit (4-bit
    /// for Q2_K) multiples of the 256-weight super-block's f16 `d` (and `dmin`).
    pub fn of(ty: QuantType) -> Result<BlockFormat> {
        let (width, qmin, qmax, offset, sub_blocks) = match ty {
            QuantType::Q8_0 => (32, -128, 127, false, 1),
            QuantType::Q4_0 => (32, -8, 7, false, 1),
            QuantType::Q5_0 => (32, -16, 15, false, 1),
            QuantType::Q4_1 => (32, 0, 15, true, 1),
            QuantType::Q2K => (16, 0, 3, true, 16),
            QuantType::Q4K => (32, 0, 15, true, 8),
            QuantType::Q3K => (16, -4, 3, false, 16),
            other => {
                return Err(Error::Config(format!(
                "learned quantization writes q8_0, q4_0, q4_1, q5_0, q4_k, q3_k or q2_k, not {}",
                other.name()
            )))
            }
        };
        Ok(BlockFormat {
            ty,
            width,
            qmin,
            qmax,
            offset,
            sub_blocks,
        })
    }

    /// Steps between the clipping threshold and the block's zero (or minimum): the threshold
    /// is `α = |d|·levels`, so γ = α / mean|w| is the QuantGPT factor, about the same size
    /// (the ratio of a block's largest to its mean magnitude) for every type.
    pub fn levels(&self) -> f32 {
        if self.offset {
            self.qmax as f32
        } else {
            -self.qmin as f32
        }
    }

    /// Round-to-nearest parameters as ggml's reference quantizers choose them (f32).
    fn rtn(&self, x: &[f32]) -> (f32, f32) {
        if self.offset {
            let lo = x.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            ((hi - lo) / self.qmax as f32, lo)
        } else {
            let max = x
                .iter()
                .cloned()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = if self.qmin == -128 {
                max.abs() / 127.0
            } else {
                max / self.qmin as f32
            };
            (d, 0.0)
        }
    }

    /// The code of `x` under stored parameters.
    fn code(&self, x: f32, d: f32, m: f32) -> i32 {
        if d == 0.0 {
            return self.qmin.max(0).min(self.qmax);
        }
        (((x - m) / d).round() as i32).clamp(self.qmin, self.qmax)
    }

    /// Squared error of a block under (f16-rounded) parameters, each weight's weighted by
    /// `weights` when given.
    fn block_error(&self, x: &[f32], d: f32, m: f32, weights: Option<&[f32]>) -> (f32, f32, f32) {
        let (d, m) = if self.sub_blocks > 1 {
            (d, m.min(0.0)) // k-quant offsets are minimums ≤ 0; their rounding is the super-block's
        } else {
            (f16::from_f32(d).to_f32(), f16::from_f32(m).to_f32())
        };
        let e = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let r = d * self.code(v, d, m) as f32 + m - v;
                weights.map_or(1.0, |w| w[i]) * r * r
            })
            .sum();
        (e, d, m)
    }

    /// First parameters of a block (`weights`: the error weights of [`ScaleInit::Imatrix`]).
    fn init(&self, x: &[f32], how: ScaleInit, weights: Option<&[f32]>) -> (f32, f32) {
        let (d, m) = self.rtn(x);
        if how == ScaleInit::Rtn || d == 0.0 {
            return (d, m);
        }
        let error = |d: f32, m: f32| self.block_error(x, d, m, weights).0;
        let mut best = (error(d, m), d, m);
        if self.offset {
            let hi = m + d * self.qmax as f32;
            let step = (hi - m) / 40.0;
            for i in 0..10 {
                for j in 0..10 {
                    let (lo2, hi2) = (m + i as f32 * step, hi - j as f32 * step);
                    let d2 = (hi2 - lo2) / self.qmax as f32;
                    let e = error(d2, lo2);
                    if e < best.0 {
                        best = (e, d2, lo2);
                    }
                }
            }
        } else {
            for k in 0..=40 {
                let d2 = d * (0.6 + 0.015 * k as f32);
                let e = error(d2, 0.0);
                if e < best.0 {
                    best = (e, d2, 0.0);
                }
            }
        }
        (best.1, best.2)
    }
}

/// Learnable quantization state of one matrix `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct QuantGrid {
    /// The block type.
    pub format: BlockFormat,
    /// Who shares γ.
    pub granularity: Granularity,
    rows: usize,
    cols: usize,
    /// Sign of each block's scale (Q4_0 and Q5_0 put the largest magnitude on −8 / −16).
    signs: Vec<f32>,
}

impl QuantGrid {
    /// The grid for a `[rows, cols]` matrix; cols must be a multiple of the block width.
    pub fn new(
        format: BlockFormat,
        granularity: Granularity,
        rows: usize,
        cols: usize,
    ) -> Result<QuantGrid> {
        let span = format.width * format.sub_blocks;
        if !cols.is_multiple_of(span) {
            return Err(Error::Config(format!(
                "rows of {cols} do not split into {} blocks of {span}",
                format.ty.name()
            )));
        }
        Ok(QuantGrid {
            format,
            granularity,
            rows,
            cols,
            signs: vec![1.0; rows * cols / format.width],
        })
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / self.format.width
    }

    fn blocks(&self) -> usize {
        self.rows * self.blocks_per_row()
    }

    /// Number of γ factors.
    pub fn groups(&self) -> usize {
        match self.granularity {
            Granularity::Block => self.blocks(),
            Granularity::Row => self.rows,
            Granularity::Module => 1,
        }
    }

    fn group_of(&self, block: usize) -> usize {
        match self.granularity {
            Granularity::Block => block,
            Granularity::Row => block / self.blocks_per_row(),
            Granularity::Module => 0,
        }
    }

    /// mean|w| of each group.
    fn group_means(&self, w: &[f32]) -> Vec<f32> {
        let mut sum = vec![0f64; self.groups()];
        let mut n = vec![0usize; self.groups()];
        for (b, block) in w.chunks(self.format.width).enumerate() {
            let g = self.group_of(b);
            sum[g] += block.iter().map(|v| v.abs() as f64).sum::<f64>();
            n[g] += block.len();
        }
        sum.iter()
            .zip(&n)
            .map(|(s, &k)| ((s / k.max(1) as f64) as f32).max(1e-12))
            .collect()
    }

    /// Initial γ `[groups]` and β `[blocks]` for weights `w`, fixing the block signs.
    pub fn init(&mut self, w: &Tensor, how: ScaleInit) -> Result<(Tensor, Tensor)> {
        self.init_weighted(w, how, None)
    }

    /// [`Self::init`] with the importance of each input column (`[cols]`, the mean squared
    /// activation entering the layer), which [`ScaleInit::Imatrix`] needs and the others
    /// ignore.
    pub fn init_weighted(
        &mut self,
        w: &Tensor,
        how: ScaleInit,
        importance: Option<&[f32]>,
    ) -> Result<(Tensor, Tensor)> {
        let importance = match (how, importance) {
            (ScaleInit::Imatrix, Some(a)) if a.len() == self.cols => Some(a),
            (ScaleInit::Imatrix, Some(a)) => {
                return Err(Error::Config(format!(
                    "an importance of {} columns for a matrix of {}",
                    a.len(),
                    self.cols
                )))
            }
            (ScaleInit::Imatrix, None) => {
                return Err(Error::Config(
                    "the imatrix start needs the importance of the layer's inputs".into(),
                ))
            }
            _ => None,
        };
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let starts = match how {
            ScaleInit::Ggml if self.format.sub_blocks > 1 => {
                let ggml = QTensor::quantize(w, self.format.ty.ggml())?;
                read_super_blocks(self.format.ty, &ggml.data()?)
            }
            ScaleInit::Ggml => block_inits(self.format, &data, ScaleInit::Rtn, None),
            _ => block_inits(self.format, &data, how, importance),
        };
        let means = self.group_means(&data);
        let mut ratio_sum = vec![0f64; self.groups()];
        let mut count = vec![0usize; self.groups()];
        let mut beta = Vec::with_capacity(self.blocks());
        for (b, (d, m)) in starts.into_iter().enumerate() {
            let g = self.group_of(b);
            self.signs[b] = if d < 0.0 { -1.0 } else { 1.0 };
            ratio_sum[g] += (d.abs() * self.format.levels() / means[g]) as f64;
            count[g] += 1;
            beta.push(m / means[g]);
        }
        let gamma: Vec<f32> = ratio_sum
            .iter()
            .zip(&count)
            .map(|(s, &k)| (s / k.max(1) as f64) as f32)
            .collect();
        let dev = Device::Cpu;
        Ok((
            Tensor::from_vec(gamma, self.groups(), &dev)?,
            Tensor::from_vec(beta, self.blocks(), &dev)?,
        ))
    }

    /// Each block's scale and offset before storage rounding.
    fn real_params(&self, w: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<(f32, f32)> {
        let means = self.group_means(w);
        (0..self.blocks())
            .map(|b| {
                let g = self.group_of(b);
                let d = self.signs[b] * gamma[g] * means[g] / self.format.levels();
                let m = if self.format.offset {
                    beta[b] * means[g]
                } else {
                    0.0
                };
                (d, m)
            })
            .collect()
    }

    /// The k-quant super-blocks' stored parameters, in order.
    fn super_params(&self, w: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<SuperParams> {
        self.real_params(w, gamma, beta)
            .chunks(self.format.sub_blocks)
            .map(|blocks| SuperParams::of(self.format.ty, blocks))
            .collect()
    }

    /// The scale and offset of every block as stored.
    fn params(&self, w: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<BlockParams> {
        if self.format.sub_blocks > 1 {
            let n = self.format.sub_blocks;
            return self
                .super_params(w, gamma, beta)
                .iter()
                .flat_map(|sp| (0..n).map(|j| sp.block(j)))
                .collect();
        }
        self.real_params(w, gamma, beta)
            .into_iter()
            .map(|(d, m)| (f16::from_f32(d).to_f32(), f16::from_f32(m).to_f32()))
            .collect()
    }

    /// `ŵ = d·q + m`, differentiable in w (when `train_weights`), γ and β.
    pub fn fake_quant(
        &self,
        w: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        train_weights: bool,
    ) -> Result<Tensor> {
        Ok(w.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            FakeQuant {
                grid: self.clone(),
                train_weights,
            },
        )?)
    }

    /// The matrix as a GGUF tensor of the grid's type, holding exactly `fake_quant`'s values.
    pub fn encode(&self, w: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<QTensor> {
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let (gamma, beta) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
        let f = self.format;
        let mut bytes = Vec::new();
        if f.sub_blocks > 1 {
            let span = f.width * f.sub_blocks;
            let supers = self.super_params(&data, &gamma, &beta);
            for (weights, sp) in data.chunks(span).zip(&supers) {
                sp.write(&f, weights, &mut bytes);
            }
        } else {
            let params = self.params(&data, &gamma, &beta);
            let mut codes = vec![0i32; f.width];
            for (block, &(d, m)) in data.chunks(f.width).zip(&params) {
                for (c, &x) in codes.iter_mut().zip(block) {
                    *c = f.code(x, d, m);
                }
                write_block(f.ty, f16::from_f32(d), f16::from_f32(m), &codes, &mut bytes);
            }
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, f.ty.ggml())?;
        Ok(QTensor::new(storage, (self.rows, self.cols))?)
    }
}

/// The fake-quantization op (see the module docs).
struct FakeQuant {
    grid: QuantGrid,
    train_weights: bool,
}

impl CustomOp3 for FakeQuant {
    fn name(&self) -> &'static str {
        "fake-quant"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, gamma, beta) = (slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?);
        let f = self.grid.format;
        let params = self.grid.params(w, gamma, beta);
        let mut out = Vec::with_capacity(w.len());
        for (block, &(d, m)) in w.chunks(f.width).zip(&params) {
            out.extend(block.iter().map(|&x| d * f.code(x, d, m) as f32 + m));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        w: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grid = &self.grid;
        let f = grid.format;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let gam = gamma.to_vec1::<f32>()?;
        let bet = beta.to_vec1::<f32>()?;
        let means = grid.group_means(&wv);
        let params = grid.params(&wv, &gam, &bet);
        let mut grad_gamma = vec![0f32; gam.len()];
        let mut grad_beta = vec![0f32; bet.len()];
        // ∂L/∂mean|w| per group, for the weights' gradient.
        let mut grad_mean = vec![0f32; means.len()];
        let mut grad_w = if self.train_weights {
            vec![0f32; wv.len()]
        } else {
            Vec::new()
        };
        for (b, &(d, m)) in params.iter().enumerate() {
            let span = b * f.width..(b + 1) * f.width;
            let (mut sum_d, mut sum_m) = (0f32, 0f32);
            for i in span {
                let (x, gi) = (wv[i], gv[i]);
                if d == 0.0 {
                    sum_m += gi;
                    continue;
                }
                let v = (x - m) / d;
                if v < f.qmin as f32 || v > f.qmax as f32 {
                    let q = v.clamp(f.qmin as f32, f.qmax as f32);
                    sum_d += gi * q;
                    sum_m += gi;
                } else {
                    sum_d += gi * (v.round() - v);
                    if self.train_weights {
                        grad_w[i] = gi;
                    }
                }
            }
            let grp = grid.group_of(b);
            let s = grid.signs[b];
            let levels = f.levels();
            grad_gamma[grp] += sum_d * s * means[grp] / levels;
            grad_mean[grp] += sum_d * s * gam[grp] / levels;
            if f.offset {
                grad_beta[b] = sum_m * means[grp];
                grad_mean[grp] += sum_m * bet[b];
            }
        }
        let dev = w.device();
        let grad_w = if self.train_weights {
            let mut n = vec![0usize; means.len()];
            for b in 0..grid.blocks() {
                n[grid.group_of(b)] += f.width;
            }
            for (i, gw) in grad_w.iter_mut().enumerate() {
                let grp = grid.group_of(i / f.width);
                *gw += grad_mean[grp] * wv[i].signum() / n[grp] as f32;
            }
            Some(Tensor::from_vec(grad_w, w.shape(), dev)?)
        } else {
            None
        };
        Ok((
            grad_w,
            Some(Tensor::from_vec(grad_gamma, gamma.shape(), dev)?),
            f.offset
                .then(|| Tensor::from_vec(grad_beta, beta.shape(), dev))
                .transpose()?,
        ))
    }
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Granularity::from_name(s)
    }
}

impl std::str::FromStr for ScaleInit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rtn" => Ok(ScaleInit::Rtn),
            "mse" => Ok(ScaleInit::Mse),
            "imatrix" => Ok(ScaleInit::Imatrix),
            "ggml" => Ok(ScaleInit::Ggml),
            other => Err(Error::Config(format!(
                "unknown scale init `{other}` (mse, imatrix, ggml or rtn)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
