//! Writing trained adapters: our own safetensors (to reload), a merged GGUF, a GGUF LoRA
//! adapter llama.cpp applies at run time, and PEFT's `adapter_model.safetensors`.

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterKind, Target};
use crate::{AdaptedModel, AdapterConfig, Architecture, BaseWeights, Error, Result};

/// `adapter.json`, written beside `adapter.safetensors`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterFile {
    /// The adapter's shape and initialisation.
    pub config: AdapterConfig,
    /// The base model it was trained on.
    pub base: String,
    /// Trainable weights.
    pub trainable: usize,
}

/// Saves the adapter's variables and configuration into `dir`.
pub fn save_adapter(model: &AdaptedModel, base: &BaseWeights, dir: &Path) -> Result<()> {
    let config = model
        .adapter()
        .ok_or_else(|| Error::Config("the model has no adapter to save".into()))?;
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let weights: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&weights, dir.join("adapter.safetensors"))?;
    let file = AdapterFile {
        config: config.clone(),
        base: base.path.display().to_string(),
        trainable: model.trainable_parameters(),
    };
    let path = dir.join("adapter.json");
    let json = serde_json::to_vec_pretty(&file).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, json).map_err(Error::io(&path))
}

/// Loads an adapter saved by [`save_adapter`] onto `base`.
pub fn load_adapter(base: &BaseWeights, dir: &Path) -> Result<AdaptedModel> {
    let path = dir.join("adapter.json");
    let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
    let file: AdapterFile = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    let model = AdaptedModel::new(base, Some(&file.config))?;
    let weights = candle_core::safetensors::load(dir.join("adapter.safetensors"), &Device::Cpu)?;
    for (name, var) in model.named_vars() {
        let t = weights
            .get(&name)
            .ok_or_else(|| Error::CheckpointMismatch {
                path: dir.to_path_buf(),
                message: format!("variable {name} is missing"),
            })?;
        var.set(t)?;
    }
    Ok(model)
}

/// Element type of a written GGUF's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    /// 32-bit.
    F32,
    /// 16-bit.
    F16,
}

impl FloatType {
    fn ggml(self) -> GgmlDType {
        match self {
            FloatType::F32 => GgmlDType::F32,
            FloatType::F16 => GgmlDType::F16,
        }
    }
}

pub(crate) fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let tmp = path.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(Error::io(&tmp))?;
    let mut w = BufWriter::new(file);
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    candle_core::quantized::gguf_file::write(&mut w, &meta, &ts)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

/// Base + ΔW in memory, ready to quantize. LoRETTA_adp has no linear form and is refused.
pub fn merge(model: &AdaptedModel, base: &BaseWeights) -> Result<BaseWeights> {
    check_linear(model)?;
    let merged: HashMap<String, Tensor> = model
        .deltas()
        .into_iter()
        .map(|(layer, target, _)| {
            Ok((
                delta_tensor_name(layer, target),
                model.merged_weight(layer, target)?,
            ))
        })
        .collect::<Result<_>>()?;
    base.with_tensors(merged)
}

/// As [`merge`], taking the model and its base: the model is dropped once its updates are
/// taken, and each replaced weight is freed as its merged one is made, so the linear weights
/// are never held twice (3.9 GB on a pruned 1.5B).
pub fn merge_into(model: AdaptedModel, base: BaseWeights) -> Result<BaseWeights> {
    check_linear(&model)?;
    let deltas: Vec<_> = model
        .deltas()
        .into_iter()
        .map(|(layer, target, d)| (delta_tensor_name(layer, target), d.clone()))
        .collect();
    drop(model);
    let mut merged = base;
    for (name, delta) in deltas {
        let weight = (merged.get(&name)? + delta.delta_weight()?)?;
        merged = merged.with_tensors(HashMap::from([(name, weight)]))?;
    }
    Ok(merged)
}

/// The GGUF names of the tensors [`merge`] changes: the weights the adapter updates.
pub fn merged_tensor_names(model: &AdaptedModel) -> Vec<String> {
    model
        .deltas()
        .into_iter()
        .map(|(layer, target, _)| delta_tensor_name(layer, target))
        .collect()
}

fn delta_tensor_name(layer: usize, target: Target) -> String {
    format!("blk.{layer}.{}.weight", target.gguf())
}

/// Writes base + ΔW as a complete GGUF (same metadata, tokenizer and tensor names as the base;
/// matrices in `ty`, norms in f32). LoRETTA_adp has no linear form and is refused.
pub fn write_merged_gguf(
    model: &AdaptedModel,
    base: &BaseWeights,
    path: &Path,
    ty: FloatType,
) -> Result<()> {
    let merged = merge(model, base)?;
    let mut tensors = Vec::with_capacity(base.names().len());
    for name in base.names() {
        let t = merged.get(name)?;
        let dtype = if t.rank() >= 2 {
            ty.ggml()
        } else {
            GgmlDType::F32
        };
        tensors.push((name.clone(), QTensor::quantize(t, dtype)?));
    }
    let mut metadata = base.metadata.clone();
    let file_type = match ty {
        FloatType::F32 => 0u32,
        FloatType::F16 => 1,
    };
    set(&mut metadata, "general.file_type", Value::U32(file_type));
    write_gguf(path, &metadata, &tensors)
}

fn set(metadata: &mut Vec<(String, Value)>, key: &str, value: Value) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => metadata.push((key.to_string(), value)),
    }
}

/// Refuses LoRETTA_adp, which has no linear form to merge.
fn check_linear(model: &AdaptedModel) -> Result<()> {
    match model.adapter() {
        Some(a) if a.kind == AdapterKind::LorettaAdp => Err(not_linear()),
        _ => Ok(()),
    }
}

fn not_linear() -> Error {
    Error::NotExportable(
        "LoRETTA_adp is a bottleneck with a ReLU after the MLP: it cannot be folded into a \
         linear weight update, so it has no merged or LoRA form; serve it through candle or \
         train loretta-rep instead"
            .into(),
    )
}

/// Writes the adapter as a GGUF LoRA adapter llama.cpp loads at run time
/// (`general.type = adapter`, `adapter.type = lora`, `<tensor>.lora_a` / `.lora_b`).
/// MoSLoRA's mixer is folded into A and LoRETTA's cores are contracted first.
pub fn write_gguf_lora(model: &AdaptedModel, base: &BaseWeights, path: &Path) -> Result<()> {
    let config = model
        .adapter()
        .ok_or_else(|| Error::Config("the model has no adapter".into()))?;
    if config.kind == AdapterKind::LorettaAdp {
        return Err(not_linear());
    }
    let arch = base
        .metadata
        .iter()
        .find(|(k, _)| k == "general.architecture")
        .map(|(_, v)| v.clone())
        .unwrap_or(Value::String("llama".into()));
    let metadata = vec![
        ("general.architecture".to_string(), arch),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        (
            "adapter.lora.alpha".to_string(),
            Value::F32(config.alpha as f32),
        ),
    ];
    let mut tensors = Vec::new();
    for (layer, target, delta) in model.deltas() {
        let (a, b) = delta.lora_factors()?;
        let stem = delta_tensor_name(layer, target);
        tensors.push((
            format!("{stem}.lora_a"),
            QTensor::quantize(&a, GgmlDType::F32)?,
        ));
        tensors.push((
            format!("{stem}.lora_b"),
            QTensor::quantize(&b, GgmlDType::F32)?,
        ));
    }
    write_gguf(path, &metadata, &tensors)
}

/// Rows of a GGUF q/k projection in Hugging Face order: llama.cpp's converter interleaves the
/// two rotary halves of each head, so `hf[h·d + j·d/2 + i] = gguf[h·d + 2i + j]`.
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let d = rows / heads;
    let mut idx = vec![0u32; rows];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                idx[h * d + j * (d / 2) + i] = (h * d + 2 * i + j) as u32;
            }
        }
    }
    Ok(t.index_select(&Tensor::from_vec(idx, rows, &Device::Cpu)?, 0)?)
}

/// Writes PEFT's `adapter_model.safetensors` and `adapter_config.json` into `dir`, in Hugging
/// Face layout (q/k rows un-permuted). The base weights here are those of the GGUF, so the
/// adapter fits the original checkpoint up to its quantization error.
pub fn write_peft(model: &AdaptedModel, base: &BaseWeights, dir: &Path) -> Result<()> {
    let config = model
        .adapter()
        .ok_or_else(|| Error::Config("the model has no adapter".into()))?;
    if config.kind == AdapterKind::LorettaAdp {
        return Err(not_linear());
    }
    let c = model.config();
    if c.architecture == Architecture::Deci {
        return Err(Error::NotExportable(
            "a pruned (deci) model has no Hugging Face layout PEFT adapters fit".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut modules: Vec<&str> = Vec::new();
    let mut rank = config.rank;
    for (layer, target, delta) in model.deltas() {
        let (a, mut b) = delta.lora_factors()?;
        rank = a.dim(0)?;
        // llama's GGUF q/k rows are permuted for interleaved RoPE; Hugging Face's are not.
        match target {
            Target::Q if c.architecture == Architecture::Llama => b = unpermute_rows(&b, c.n_head)?,
            Target::K if c.architecture == Architecture::Llama => {
                b = unpermute_rows(&b, c.n_head_kv)?
            }
            _ => {}
        }
        let stem = format!("base_model.model.model.layers.{layer}.{}", target.hf());
        out.insert(format!("{stem}.lora_A.weight"), a.contiguous()?);
        out.insert(format!("{stem}.lora_B.weight"), b.contiguous()?);
        let module = target.hf().rsplit('.').next().unwrap_or_default();
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    candle_core::safetensors::save(&out, dir.join("adapter_model.safetensors"))?;
    let name = base
        .metadata
        .iter()
        .find(|(k, _)| k == "general.name")
        .and_then(|(_, v)| v.to_string().ok().cloned())
        .unwrap_or_else(|| base.path.display().to_string());
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": name,
        "r": rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "target_modules": modules,
    });
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json).expect("json")).map_err(Error::io(&path))
}

impl std::str::FromStr for FloatType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(FloatType::F16),
            "f32" => Ok(FloatType::F32),
            other => Err(Error::Config(format!(
                "unknown type `{other}` (f16 or f32)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_inverts_the_converters_interleave() {
        // Two heads of size 4: HF rows [a0 a1 b0 b1 | c0 c1 d0 d1] become GGUF [a0 b0 a1 b1 | …].
        let gguf =
            Tensor::from_vec(vec![0f32, 2., 1., 3., 4., 6., 5., 7.], (8, 1), &Device::Cpu).unwrap();
        let hf: Vec<f32> = unpermute_rows(&gguf, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(hf, vec![0., 1., 2., 3., 4., 5., 6., 7.]);
    }
}
