//! BERT in candle, as the sentence-transformers MiniLM encoders use it: token, position and
//! segment embeddings, then post-norm layers of multi-head self-attention and a GELU MLP.
//! Every op is differentiable, so a student whose weights are built from trainable tensors
//! (weight-inherited distillation) runs through the same forward pass.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of a BERT model (Hugging Face's `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of each MLP.
    pub intermediate_size: usize,
    /// Positions the position embedding holds.
    pub max_position_embeddings: usize,
    /// Token vocabulary.
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Width of one attention head, when not `hidden_size / num_attention_heads` (a
    /// compressed model keeps its heads' width while its hidden size shrinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_head_size: Option<usize>,
}

impl BertConfig {
    /// Width of one attention head.
    pub fn head_size(&self) -> usize {
        self.attention_head_size
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

/// A BERT model: its configuration and its tensors by Hugging Face name
/// (`encoder.layer.0.attention.self.query.weight`, …).
#[derive(Debug, Clone)]
pub struct Bert {
    /// The shape.
    pub config: BertConfig,
    tensors: HashMap<String, Tensor>,
}

/// Names of the tensors of layer `i`, by role.
const LAYER_TENSORS: [&str; 8] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
];

impl Bert {
    /// Reads `config.json` and `model.safetensors` from `dir`, checking every tensor the
    /// forward pass uses is there.
    pub fn load(dir: &Path) -> Result<Bert> {
        let config_path = dir.join("config.json");
        let bytes = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: BertConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Model {
            path: config_path.clone(),
            reason: format!("not a BERT config.json: {e}"),
        })?;
        let weights = dir.join("model.safetensors");
        let tensors =
            candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| Error::Model {
                path: weights.clone(),
                reason: e.to_string(),
            })?;
        Bert::from_tensors(config, tensors).map_err(|reason| Error::Model {
            path: weights,
            reason,
        })
    }

    /// A model of `config` from tensors by name (f32; other float types are converted).
    pub fn from_tensors(
        config: BertConfig,
        tensors: HashMap<String, Tensor>,
    ) -> std::result::Result<Bert, String> {
        let mut kept = HashMap::new();
        let mut wanted = vec![
            "embeddings.word_embeddings.weight".to_string(),
            "embeddings.position_embeddings.weight".to_string(),
            "embeddings.token_type_embeddings.weight".to_string(),
            "embeddings.LayerNorm.weight".to_string(),
            "embeddings.LayerNorm.bias".to_string(),
        ];
        for i in 0..config.num_hidden_layers {
            for t in LAYER_TENSORS {
                wanted.push(format!("encoder.layer.{i}.{t}.weight"));
                wanted.push(format!("encoder.layer.{i}.{t}.bias"));
            }
        }
        for name in wanted {
            let t = tensors
                .get(&name)
                .or_else(|| tensors.get(&format!("bert.{name}")))
                .ok_or_else(|| format!("tensor {name} is missing"))?;
            let t = t.to_dtype(DType::F32).map_err(|e| e.to_string())?;
            kept.insert(name, t);
        }
        Ok(Bert {
            config,
            tensors: kept,
        })
    }

    /// The tensors by name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// Final hidden states `[b, t, hidden]` of token ids `[b, t]` (u32) where `mask`
    /// `[b, t]` (f32) is 1 on real tokens and 0 on padding.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        forward_with(&self.config, &self.tensors, None, ids, mask)
    }
}

/// The tensor `name` of `tensors`.
fn get<'a>(tensors: &'a HashMap<String, Tensor>, name: &str) -> candle_core::Result<&'a Tensor> {
    tensors
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("tensor {name} is missing")))
}

/// `x·Wᵀ + b` of the linear map `name` on `x` `[n, in]`.
fn linear(
    tensors: &HashMap<String, Tensor>,
    name: &str,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let w = get(tensors, &format!("{name}.weight"))?;
    let b = get(tensors, &format!("{name}.bias"))?;
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// LayerNorm `name` over the last dimension of `x`; with `weights` `[hidden]` and their sum,
/// mean and variance are weighted means (a dimension of weight 0 is left out of both).
fn layer_norm(
    tensors: &HashMap<String, Tensor>,
    name: &str,
    x: &Tensor,
    weights: Option<(&Tensor, f64)>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let w = get(tensors, &format!("{name}.weight"))?;
    let b = get(tensors, &format!("{name}.bias"))?;
    let mean_of = |v: &Tensor| match weights {
        None => v.mean_keepdim(D::Minus1),
        Some((m, total)) => v
            .broadcast_mul(m)?
            .sum_keepdim(D::Minus1)?
            .affine(1.0 / total.max(1e-12), 0.0),
    };
    let mean = mean_of(x)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = mean_of(&centred.sqr()?)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// [`Bert::forward`] over `tensors` by Hugging Face name, of shape `config`. With
/// `norm_weights` `[hidden]`, every LayerNorm weighs its statistics by them: a student whose
/// hidden dimensions are being removed (weight going to 0) computes at the end exactly what
/// the smaller model without them computes.
pub fn forward_with(
    config: &BertConfig,
    tensors: &HashMap<String, Tensor>,
    norm_weights: Option<&Tensor>,
    ids: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let c = config;
    let (b, t) = ids.dims2()?;
    let (nh, hs) = (c.num_attention_heads, c.head_size());
    // The weights' sum, read once for the 13 LayerNorms of a forward pass.
    let norm_weights = match norm_weights {
        Some(m) => Some((m, m.sum_all()?.to_scalar::<f32>()? as f64)),
        None => None,
    };
    let norm =
        |name: &str, x: &Tensor| layer_norm(tensors, name, x, norm_weights, c.layer_norm_eps);
    let words =
        get(tensors, "embeddings.word_embeddings.weight")?.index_select(&ids.flatten_all()?, 0)?;
    let positions = get(tensors, "embeddings.position_embeddings.weight")?.narrow(0, 0, t)?;
    let segment = get(tensors, "embeddings.token_type_embeddings.weight")?.narrow(0, 0, 1)?;
    let h = words.reshape((b, t, ()))?;
    let h = h.broadcast_add(&positions)?.broadcast_add(&segment)?;
    let mut x = norm("embeddings.LayerNorm", &h)?.reshape((b * t, ()))?;
    // 0 where a key is a real token, a large negative number where it is padding.
    let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
    let scale = 1.0 / (hs as f64).sqrt();
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let heads = |name: &str| -> candle_core::Result<Tensor> {
            linear(tensors, &format!("{p}.attention.self.{name}"), &x)?
                .reshape((b, t, nh, hs))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads("query")?, heads("key")?, heads("value")?);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let att = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * t, nh * hs))?;
        let att = linear(tensors, &format!("{p}.attention.output.dense"), &att)?;
        x = norm(&format!("{p}.attention.output.LayerNorm"), &(att + &x)?)?;
        let inner = linear(tensors, &format!("{p}.intermediate.dense"), &x)?.gelu_erf()?;
        let out = linear(tensors, &format!("{p}.output.dense"), &inner)?;
        x = norm(&format!("{p}.output.LayerNorm"), &(out + &x)?)?;
    }
    x.reshape((b, t, ()))
}

/// Mean of the hidden states `[b, t, h]` over the real tokens of `mask` `[b, t]`, scaled to
/// unit length (sentence-transformers' mean pooling and Normalize modules).
pub fn mean_pool_normalized(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    let mean = sum.broadcast_div(&count)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norm)
}
