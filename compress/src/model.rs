//! The llama transformer in candle, with a frozen base and optional adapters.
//!
//! Only the adapters are [`Var`]s, so backpropagation computes gradients for them alone. Norms,
//! RoPE, adapted linears, the gated MLP and attention are single ops with their own backward
//! pass ([`crate::fused`], [`crate::attention`]), so training keeps one tensor per op alive.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::{AdapterConfig, AdapterKind, LinearDelta, Target, TtBottleneck};
use crate::fused::rms_norm;
use crate::init::Rng;
use crate::weights::{BaseWeights, LlamaConfig};
use crate::Result;

/// One batch of token rows: ids, per-token positions and which tokens may attend to which.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, t]` u32 token ids.
    pub tokens: Tensor,
    /// `[b, t]` u32 positions (restarting at 0 for each packed example).
    pub positions: Tensor,
    /// `[b, 1, t, t]` f32 additive mask: 0 where attention is allowed, -∞ elsewhere.
    pub mask: Tensor,
}

impl Batch {
    /// A batch from rows of equal length, each split into segments that attend only within
    /// themselves (causally). `segments[i]` lists the segment lengths of row `i`; a row's
    /// remainder after its segments is padding, which attends only to itself.
    pub fn packed(rows: &[Vec<u32>], segments: &[Vec<usize>]) -> Result<Batch> {
        let b = rows.len();
        let t = rows.first().map_or(0, |r| r.len());
        let mut pos = vec![0u32; b * t];
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (i, segs) in segments.iter().enumerate() {
            let mut start = 0;
            let mut spans: Vec<(usize, usize)> = segs
                .iter()
                .map(|&len| {
                    let s = (start, start + len);
                    start += len;
                    s
                })
                .collect();
            spans.extend((start..t).map(|p| (p, p + 1)));
            for (s, e) in spans {
                for q in s..e.min(t) {
                    pos[i * t + q] = (q - s) as u32;
                    for k in s..=q {
                        mask[(i * t + q) * t + k] = 0.0;
                    }
                }
            }
        }
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Ok(Batch {
            tokens: Tensor::from_vec(flat, (b, t), &Device::Cpu)?,
            positions: Tensor::from_vec(pos, (b, t), &Device::Cpu)?,
            mask: Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu)?,
        })
    }

    /// One unpacked sequence with a plain causal mask.
    pub fn single(tokens: &[u32]) -> Result<Batch> {
        Batch::packed(&[tokens.to_vec()], &[vec![tokens.len()]])
    }
}

#[derive(Clone)]
struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    linears: HashMap<Target, (Tensor, Option<LinearDelta>)>,
    /// Biases of q, k and v (qwen2).
    biases: HashMap<Target, Tensor>,
    bottleneck: Option<TtBottleneck>,
}

/// Multipliers on a model's prunable structures (what [`crate::prune`] learns): one per query
/// head and per MLP channel of each layer, and one per hidden dimension shared by all layers.
#[derive(Debug, Clone)]
pub struct StructureMasks {
    /// `[n_head]` per layer, on each head's attention output (before the output projection).
    pub heads: Vec<Tensor>,
    /// `[n_ff]` per layer, on the gated MLP's inner activations.
    pub ffn: Vec<Tensor>,
    /// `[n_embd]`, on the token embedding and on every attention and MLP output added to the
    /// residual stream (so the stream of a dimension is its mask times the unmasked one).
    pub hidden: Tensor,
}

/// A llama-family model (llama, qwen2, deci) whose linear layers may carry adapters.
pub struct AdaptedModel {
    config: LlamaConfig,
    adapter: Option<AdapterConfig>,
    masks: Option<StructureMasks>,
    embedding: Tensor,
    output: Tensor,
    output_norm: Tensor,
    layers: Vec<Layer>,
    cos: Tensor,
    sin: Tensor,
}

impl std::fmt::Debug for AdaptedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdaptedModel")
            .field("config", &self.config)
            .field("adapter", &self.adapter)
            .finish()
    }
}

/// Positions the RoPE tables cover.
const MAX_POSITIONS: usize = 8192;

impl AdaptedModel {
    /// The base model with adapters of `adapter` (fresh, seeded) — or none.
    pub fn new(base: &BaseWeights, adapter: Option<&AdapterConfig>) -> Result<AdaptedModel> {
        if let Some(a) = adapter {
            a.validate()?;
        }
        let config = base.config.clone();
        let mut rng = Rng::new(adapter.map_or(0, |a| a.seed));
        let mut layers = Vec::with_capacity(config.n_layer);
        let first = adapter.map_or(0, |a| a.first_layer(config.n_layer));
        for i in 0..config.n_layer {
            let mut linears = HashMap::new();
            let adapter = adapter.filter(|_| i >= first);
            for target in Target::ALL {
                let w = base
                    .get(&format!("blk.{i}.{}.weight", target.gguf()))?
                    .clone();
                let delta = match adapter {
                    Some(a) if a.kind != AdapterKind::LorettaAdp && a.targets.contains(&target) => {
                        let (out_dim, in_dim) = w.dims2()?;
                        Some(LinearDelta::new(a, in_dim, out_dim, &mut rng)?)
                    }
                    _ => None,
                };
                linears.insert(target, (w, delta));
            }
            let bottleneck = match adapter {
                Some(a) if a.kind == AdapterKind::LorettaAdp => {
                    Some(TtBottleneck::new(a, config.n_embd, &mut rng)?)
                }
                _ => None,
            };
            let mut biases = HashMap::new();
            if config.qkv_bias {
                for target in [Target::Q, Target::K, Target::V] {
                    let name = format!("blk.{i}.{}.bias", target.gguf());
                    biases.insert(target, base.get(&name)?.clone());
                }
            }
            layers.push(Layer {
                biases,
                attn_norm: base.get(&format!("blk.{i}.attn_norm.weight"))?.clone(),
                ffn_norm: base.get(&format!("blk.{i}.ffn_norm.weight"))?.clone(),
                linears,
                bottleneck,
            });
        }
        let half = config.head_dim() / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_base
                    .powf(2.0 * i as f32 / config.head_dim() as f32)
            })
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &Device::Cpu)?;
        let pos = Tensor::arange(0u32, MAX_POSITIONS as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((MAX_POSITIONS, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok(AdaptedModel {
            embedding: base.get("token_embd.weight")?.clone(),
            output: base.output()?.clone(),
            output_norm: base.get("output_norm.weight")?.clone(),
            cos: angles.cos()?,
            sin: angles.sin()?,
            layers,
            adapter: adapter.cloned(),
            masks: None,
            config,
        })
    }

    /// The transformer's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The adapter configuration, if any.
    pub fn adapter(&self) -> Option<&AdapterConfig> {
        self.adapter.as_ref()
    }

    /// Every trainable variable with a stable name (`blk.3.attn_q.lora_a`, …).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for target in Target::ALL {
                if let Some((_, Some(delta))) = layer.linears.get(&target) {
                    delta.named_vars(&format!("blk.{i}.{}", target.gguf()), &mut out);
                }
            }
            if let Some(b) = &layer.bottleneck {
                b.named_vars(&format!("blk.{i}.ffn_adapter"), &mut out);
            }
        }
        out
    }

    /// Number of trainable weights.
    pub fn trainable_parameters(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The linear updates per (layer, target), for merging and export.
    pub fn deltas(&self) -> Vec<(usize, Target, &LinearDelta)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for target in Target::ALL {
                if let Some((_, Some(d))) = layer.linears.get(&target) {
                    out.push((i, target, d));
                }
            }
        }
        out
    }

    /// Final hidden states `[b, t, n_embd]` (after the output norm).
    pub fn hidden(&self, batch: &Batch) -> Result<Tensor> {
        self.hidden_from(batch, 0, self.embed(batch)?)
    }

    /// The token embeddings of `batch` as the residual stream `[b·t, n_embd]` entering layer 0.
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let x = self
            .embedding
            .index_select(&batch.tokens.flatten_all()?, 0)?;
        Ok(match &self.masks {
            Some(m) => x.broadcast_mul(&m.hidden)?,
            None => x,
        })
    }

    /// The residual stream `[b·t, n_embd]` entering layer `layer` (`layer` = the layer count:
    /// leaving the last one, before the output norm).
    pub fn stream_at(&self, batch: &Batch, layer: usize) -> Result<Tensor> {
        self.run_layers(batch, 0..layer, self.embed(batch)?, &mut |_, _, _| Ok(()))
    }

    /// Runs every layer on `batch`, showing `observe(layer, targets, x)` each input `x`
    /// `[b·t, in]` as it enters the linear weights `targets` of `layer` (how
    /// [`crate::importance`] measures activations). Returns the output layer's input: the
    /// final hidden states `[b·t, n_embd]`, after the output norm.
    pub fn observe_inputs(&self, batch: &Batch, observe: &mut InputObserver) -> Result<Tensor> {
        let x = self.embed(batch)?;
        let x = self.run_layers(batch, 0..self.layers.len(), x, observe)?;
        rms_norm(&x, &self.output_norm, self.config.rms_eps)
    }

    /// Final hidden states `[b, t, n_embd]` from the residual stream `x` `[b·t, n_embd]`
    /// entering layer `from` (as [`Self::stream_at`] returns it).
    pub fn hidden_from(&self, batch: &Batch, from: usize, x: Tensor) -> Result<Tensor> {
        let (b, t) = batch.tokens.dims2()?;
        let x = self.run_layers(batch, from..self.layers.len(), x, &mut |_, _, _| Ok(()))?;
        let c = &self.config;
        Ok(rms_norm(&x, &self.output_norm, c.rms_eps)?.reshape((b, t, c.n_embd))?)
    }

    /// The layers `range` applied to the residual stream `x` `[b·t, n_embd]`, each linear
    /// layer's input shown to `observe`.
    fn run_layers(
        &self,
        batch: &Batch,
        range: std::ops::Range<usize>,
        mut x: Tensor,
        observe: &mut InputObserver,
    ) -> Result<Tensor> {
        let (b, t) = batch.tokens.dims2()?;
        let c = &self.config;
        let hd = c.head_dim();
        let flat_pos = batch.positions.flatten_all()?;
        let cos = self
            .cos
            .index_select(&flat_pos, 0)?
            .reshape((b, t, hd / 2))?;
        let sin = self
            .sin
            .index_select(&flat_pos, 0)?
            .reshape((b, t, hd / 2))?;
        let neox = c.architecture.neox_rope();
        let rope = |x: Tensor| crate::fused::rope(&x, &cos, &sin, neox);
        let masks = self.masks.as_ref();
        let to_stream = |x: Tensor| -> Result<Tensor> {
            Ok(match masks {
                Some(m) => x.broadcast_mul(&m.hidden)?,
                None => x,
            })
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, layer) in self
            .layers
            .iter()
            .enumerate()
            .take(range.end)
            .skip(range.start)
        {
            // Head counts follow from the weights: a pruned (deci) model's differ by layer.
            let nh = layer.linears[&Target::Q].0.dim(0)? / hd;
            let nkv = layer.linears[&Target::K].0.dim(0)? / hd;
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            observe(i, &[Target::Q, Target::K, Target::V], &h)?;
            let q = layer.linear(Target::Q, &h)?;
            let k = layer.linear(Target::K, &h)?;
            let v = layer.linear(Target::V, &h)?;
            let q = rope(q.reshape((b, t, nh, hd))?.transpose(1, 2)?)?;
            let k = rope(k.reshape((b, t, nkv, hd))?.transpose(1, 2)?)?;
            let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
            let (k, v) = (repeat_kv(k, nh)?, repeat_kv(v, nh)?);
            let mut att = crate::attention::attention(&q, &k, &v, &batch.mask, scale)?;
            if let Some(m) = masks {
                att = att.broadcast_mul(&m.heads[i].reshape((1, nh, 1, 1))?)?;
            }
            let att = att.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            observe(i, &[Target::O], &att)?;
            x = (x + to_stream(layer.linear(Target::O, &att)?)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            observe(i, &[Target::Gate, Target::Up], &h)?;
            let gate = layer.linear(Target::Gate, &h)?;
            let up = layer.linear(Target::Up, &h)?;
            let mut inner = crate::fused::swiglu(&gate, &up)?;
            if let Some(m) = masks {
                inner = inner.broadcast_mul(&m.ffn[i])?;
            }
            observe(i, &[Target::Down], &inner)?;
            let mut m = layer.linear(Target::Down, &inner)?;
            if let Some(bn) = &layer.bottleneck {
                m = bn.forward(&m)?;
            }
            x = (x + to_stream(m)?)?;
        }
        Ok(x)
    }

    /// This model with multipliers on its heads, MLP channels and hidden dimensions
    /// (differentiable when the masks are, which is how [`crate::prune`] learns them).
    pub fn with_masks(&self, masks: StructureMasks) -> AdaptedModel {
        AdaptedModel {
            config: self.config.clone(),
            adapter: self.adapter.clone(),
            masks: Some(masks),
            embedding: self.embedding.clone(),
            output: self.output.clone(),
            output_norm: self.output_norm.clone(),
            layers: self.layers.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
        }
    }

    /// Logits `[n, vocab]` for hidden states `[n, n_embd]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        crate::fused::linear(hidden, &self.output)
    }

    /// Next-token logits at every position of one sequence: `[t, vocab]`.
    pub fn sequence_logits(&self, tokens: &[u32]) -> Result<Tensor> {
        let h = self.hidden(&Batch::single(tokens)?)?;
        let t = tokens.len();
        self.logits(&h.reshape((t, self.config.n_embd))?)
    }

    /// This model with other weights: `embedding` for the token embedding (and the output
    /// layer, when tied) and `linear(layer, target, w)` for each base linear weight `w`.
    /// Adapters are kept. Differentiable tensors stay differentiable, which is how a
    /// fake-quantized student is built from trainable scales.
    pub fn with_weights(
        &self,
        embedding: Option<(Tensor, Tensor)>,
        mut linear: impl FnMut(usize, Target, &Tensor) -> Result<Tensor>,
    ) -> Result<AdaptedModel> {
        let mut layers = self.layers.clone();
        for (i, layer) in layers.iter_mut().enumerate() {
            for (target, (w, _)) in layer.linears.iter_mut() {
                *w = linear(i, *target, w)?;
            }
        }
        let (embedding, output) =
            embedding.unwrap_or((self.embedding.clone(), self.output.clone()));
        Ok(AdaptedModel {
            config: self.config.clone(),
            adapter: self.adapter.clone(),
            masks: self.masks.clone(),
            embedding,
            output,
            output_norm: self.output_norm.clone(),
            layers,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
        })
    }

    /// The weight of a linear layer with its update merged in: W₀ + ΔW.
    pub fn merged_weight(&self, layer: usize, target: Target) -> Result<Tensor> {
        let (w, delta) = &self.layers[layer].linears[&target];
        Ok(match delta {
            Some(d) => (w + d.delta_weight()?)?,
            None => w.clone(),
        })
    }
}

/// What sees each linear layer's input in [`AdaptedModel::observe_inputs`]: the layer, the
/// weights the input enters, and the input `[b·t, in]`.
pub type InputObserver<'a> = dyn FnMut(usize, &[Target], &Tensor) -> Result<()> + 'a;

/// Keys or values `[b, n_kv, t, hd]` repeated for grouped-query attention to `[b, nh, t, hd]`
/// (contiguous either way).
fn repeat_kv(z: Tensor, nh: usize) -> Result<Tensor> {
    let (b, nkv, t, hd) = z.dims4()?;
    if nkv == nh {
        return Ok(z.contiguous()?);
    }
    Ok(z.unsqueeze(2)?
        .expand((b, nkv, nh / nkv, t, hd))?
        .reshape((b, nh, t, hd))?)
}

impl Layer {
    fn linear(&self, target: Target, x: &Tensor) -> Result<Tensor> {
        let (w, delta) = &self.linears[&target];
        let y = match delta {
            Some(d) => {
                let (a, b) = d.lora_factors()?;
                crate::fused::adapted_linear(x, w, &a, &b, d.scale())?
            }
            None => crate::fused::linear(x, w)?,
        };
        Ok(match self.biases.get(&target) {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_restart_positions_and_mask_other_segments() {
        let batch = Batch::packed(&[vec![1, 2, 3, 4, 0]], &[vec![2, 2]]).unwrap();
        let pos: Vec<u32> = batch.positions.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(pos, vec![0, 1, 0, 1, 0]);
        let m: Vec<Vec<f32>> = batch.mask.reshape((5, 5)).unwrap().to_vec2().unwrap();
        let allowed = |q: usize, k: usize| m[q][k] == 0.0;
        assert!(allowed(1, 0) && allowed(3, 2) && allowed(4, 4));
        assert!(!allowed(2, 1) && !allowed(0, 1) && !allowed(4, 3));
    }
}
