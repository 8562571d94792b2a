//! Cutting a plan out of a model: the kept rows and columns of every matrix, masks folded
//! into the weights, written as llama.cpp's `deci` architecture (llama's layers with a head
//! count and MLP width per layer, and q/k/v biases when the file has them).
//!
//! Deci rotates RoPE pairs `(x[2i], x[2i+1])`; a qwen2 model rotates `(x[i], x[i + d/2])`
//! (NeoX). Its query and key rows (and biases) are reordered within each head so that row
//! `2i` is the old row `i` and row `2i+1` the old row `i + d/2`: the same pairs rotate by the
//! same angles, and the reorder, applied to queries and keys alike, leaves their dot products
//! unchanged.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};

use super::plan::{Plan, Scores};
use crate::weights::LlamaConfig;
use crate::{Architecture, BaseWeights, Result, Target};

fn index(idx: &[usize]) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v, idx.len(), &Device::Cpu)?)
}

/// The rows of every head in `heads` (each `hd` rows long), in order, or (`neox`) reordered
/// for interleaved RoPE: a head's row `2i` is its row `i`, row `2i+1` its row `i + hd/2`.
fn head_rows(heads: &[usize], hd: usize, neox: bool) -> Vec<usize> {
    let within = |j: usize| if neox { j / 2 + (j % 2) * (hd / 2) } else { j };
    heads
        .iter()
        .flat_map(|&h| (0..hd).map(move |j| h * hd + within(j)))
        .collect()
}

/// `values[idx]` as a tensor, or ones without masks.
fn mask_of(values: Option<&[f32]>, idx: &[usize]) -> Result<Tensor> {
    let v: Vec<f32> = idx.iter().map(|&i| values.map_or(1.0, |m| m[i])).collect();
    Ok(Tensor::from_vec(v, idx.len(), &Device::Cpu)?)
}

/// The model `plan` keeps of `base`, with the mask values of `masks` (when the plan was
/// learned) folded in, so that it computes what the masked model computed up to the removed
/// structures: a head's mask scales its output-projection columns, a channel's its down
/// column, a hidden dimension's its embedding column and the rows of every matrix writing the
/// residual stream (and, with a tied output layer, divides the output norm, so the logits are
/// unchanged). Every RMS norm is scaled by √(n/n′) and ε by n/n′, as they now average over n′
/// dimensions.
pub fn extract(base: &BaseWeights, plan: &Plan, masks: Option<&Scores>) -> Result<BaseWeights> {
    let c = &base.config;
    let neox = c.architecture.neox_rope();
    let hd = c.head_dim();
    let hidden = index(&plan.hidden)?;
    let hidden_mask = mask_of(masks.map(|m| m.hidden.as_slice()), &plan.hidden)?;
    let ratio = c.n_embd as f64 / plan.hidden.len() as f64;
    // RMS(x′) over n′ dimensions = √(n/n′)·RMS(x) when the removed ones are zero; with ε
    // scaled by n/n′ too, the equality holds exactly, ε included.
    let (norm_scale, rms_eps) = (ratio.sqrt(), c.rms_eps * ratio);
    let tied = !base.names().iter().any(|n| n == "output.weight");
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let embd = base
        .get("token_embd.weight")?
        .index_select(&hidden, 1)?
        .broadcast_mul(&hidden_mask.unsqueeze(0)?)?;
    out.insert("token_embd.weight".into(), embd);
    if !tied {
        let o = base.get("output.weight")?.index_select(&hidden, 1)?;
        out.insert("output.weight".into(), o);
    }
    let mut output_norm = (base.get("output_norm.weight")?.index_select(&hidden, 0)? * norm_scale)?;
    if tied {
        output_norm = output_norm.broadcast_div(&hidden_mask)?;
    }
    out.insert("output_norm.weight".into(), output_norm);
    for i in 0..c.n_layer {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        let w = |t: Target| base.get(&name(t.gguf()));
        let rope_rows = |heads: &[usize]| index(&head_rows(heads, hd, neox));
        let (q_rows, k_rows) = (rope_rows(&plan.heads[i])?, rope_rows(&plan.kv_heads[i])?);
        let q_out = index(&head_rows(&plan.heads[i], hd, false))?;
        let kv_rows = index(&head_rows(&plan.kv_heads[i], hd, false))?;
        let ffn = index(&plan.ffn[i])?;
        let cols = |t: &Tensor| t.index_select(&hidden, 1);
        out.insert(
            name("attn_q"),
            cols(&w(Target::Q)?.index_select(&q_rows, 0)?)?,
        );
        out.insert(
            name("attn_k"),
            cols(&w(Target::K)?.index_select(&k_rows, 0)?)?,
        );
        out.insert(
            name("attn_v"),
            cols(&w(Target::V)?.index_select(&kv_rows, 0)?)?,
        );
        if c.qkv_bias {
            for (t, rows) in [
                (Target::Q, &q_rows),
                (Target::K, &k_rows),
                (Target::V, &kv_rows),
            ] {
                let bias = format!("blk.{i}.{}.bias", t.gguf());
                out.insert(bias.clone(), base.get(&bias)?.index_select(rows, 0)?);
            }
        }
        let head_mask: Vec<usize> = plan.heads[i]
            .iter()
            .flat_map(|&h| std::iter::repeat_n(h, hd))
            .collect();
        let head_mask = mask_of(masks.map(|m| m.heads[i].as_slice()), &head_mask)?;
        let o = w(Target::O)?
            .index_select(&hidden, 0)?
            .index_select(&q_out, 1)?
            .broadcast_mul(&head_mask.unsqueeze(0)?)?
            .broadcast_mul(&hidden_mask.unsqueeze(1)?)?;
        out.insert(name("attn_output"), o);
        for t in [Target::Gate, Target::Up] {
            out.insert(name(t.gguf()), cols(&w(t)?.index_select(&ffn, 0)?)?);
        }
        let ffn_mask = mask_of(masks.map(|m| m.ffn[i].as_slice()), &plan.ffn[i])?;
        let down = w(Target::Down)?
            .index_select(&hidden, 0)?
            .index_select(&ffn, 1)?
            .broadcast_mul(&ffn_mask.unsqueeze(0)?)?
            .broadcast_mul(&hidden_mask.unsqueeze(1)?)?;
        out.insert(name("ffn_down"), down);
        for norm in ["attn_norm", "ffn_norm"] {
            let n = (base.get(&name(norm))?.index_select(&hidden, 0)? * norm_scale)?;
            out.insert(name(norm), n);
        }
    }
    let names: Vec<String> = base
        .names()
        .iter()
        .filter(|n| out.contains_key(*n))
        .cloned()
        .collect();
    let config = LlamaConfig {
        architecture: Architecture::Deci,
        n_embd: plan.hidden.len(),
        n_ff: plan.ffn.iter().map(Vec::len).max().unwrap_or(0),
        n_head: plan.heads.iter().map(Vec::len).max().unwrap_or(0),
        n_head_kv: plan.kv_heads.iter().map(Vec::len).max().unwrap_or(0),
        rms_eps,
        ..c.clone()
    };
    let metadata = deci_metadata(&base.metadata, c.architecture.name(), plan, hd, rms_eps);
    Ok(BaseWeights::from_parts(
        base.path.clone(),
        config,
        metadata,
        out,
        names,
    ))
}

/// `base`'s metadata under the `deci.` prefix, with the plan's sizes: the hidden width, and a
/// query head count, key/value head count and MLP width per layer.
fn deci_metadata(
    base: &[(String, Value)],
    arch: &str,
    plan: &Plan,
    head_dim: usize,
    rms_eps: f64,
) -> Vec<(String, Value)> {
    let per_layer =
        |v: &[Vec<usize>]| Value::Array(v.iter().map(|x| Value::U32(x.len() as u32)).collect());
    let sizes: [(&str, Value); 8] = [
        ("embedding_length", Value::U32(plan.hidden.len() as u32)),
        ("attention.head_count", per_layer(&plan.heads)),
        ("attention.head_count_kv", per_layer(&plan.kv_heads)),
        ("feed_forward_length", per_layer(&plan.ffn)),
        ("attention.key_length", Value::U32(head_dim as u32)),
        ("attention.value_length", Value::U32(head_dim as u32)),
        ("rope.dimension_count", Value::U32(head_dim as u32)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(rms_eps as f32),
        ),
    ];
    let prefix = format!("{arch}.");
    let mut out: Vec<(String, Value)> = Vec::new();
    for (k, v) in base {
        if k == "general.architecture" {
            out.push((k.clone(), Value::String("deci".into())));
        } else if k == "general.name" {
            let name = v.to_string().map(String::as_str).unwrap_or("model");
            out.push((k.clone(), Value::String(format!("{name} (pruned)"))));
        } else if let Some(rest) = k.strip_prefix(&prefix) {
            if !sizes.iter().any(|(r, _)| *r == rest) {
                out.push((format!("deci.{rest}"), v.clone()));
            }
        } else {
            out.push((k.clone(), v.clone()));
        }
    }
    out.extend(sizes.into_iter().map(|(k, v)| (format!("deci.{k}"), v)));
    out
}
