//! Round-to-nearest quantization into GGUF block types (ggml's reference quantizers, as
//! implemented by candle), with llama-quantize's per-tensor rules for models of this size.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{BaseWeights, Error, LlamaConfig, Result};

/// A GGUF element type a model can be quantized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// 8-bit, one scale per 32.
    Q8_0,
    /// 4-bit, one scale per 32.
    Q4_0,
    /// 4-bit, scale and minimum per 32.
    Q4_1,
    /// 5-bit, one scale per 32.
    Q5_0,
    /// 5-bit, scale and minimum per 32.
    Q5_1,
    /// 2-bit k-quant (256-wide super-blocks).
    #[serde(rename = "q2_k")]
    Q2K,
    /// 3-bit k-quant.
    #[serde(rename = "q3_k")]
    Q3K,
    /// 4-bit k-quant.
    #[serde(rename = "q4_k")]
    Q4K,
    /// 5-bit k-quant.
    #[serde(rename = "q5_k")]
    Q5K,
    /// 6-bit k-quant.
    #[serde(rename = "q6_k")]
    Q6K,
}

impl QuantType {
    /// Every type, by name.
    pub const ALL: [(&'static str, QuantType); 12] = [
        ("f32", QuantType::F32),
        ("f16", QuantType::F16),
        ("q8_0", QuantType::Q8_0),
        ("q4_0", QuantType::Q4_0),
        ("q4_1", QuantType::Q4_1),
        ("q5_0", QuantType::Q5_0),
        ("q5_1", QuantType::Q5_1),
        ("q2_k", QuantType::Q2K),
        ("q3_k", QuantType::Q3K),
        ("q4_k", QuantType::Q4K),
        ("q5_k", QuantType::Q5K),
        ("q6_k", QuantType::Q6K),
    ];

    /// Parses a lower-case name (`q4_0`, `q4_k`, …).
    pub fn from_name(name: &str) -> Result<QuantType> {
        let lower = name.to_lowercase();
        QuantType::ALL
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|&(_, t)| t)
            .ok_or_else(|| {
                let names: Vec<&str> = QuantType::ALL.iter().map(|(n, _)| *n).collect();
                Error::Config(format!(
                    "unknown type `{name}` (one of {})",
                    names.join(", ")
                ))
            })
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        QuantType::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// The type of a ggml element type, when it is one of these.
    pub fn of_ggml(dtype: GgmlDType) -> Option<QuantType> {
        QuantType::ALL
            .iter()
            .map(|&(_, t)| t)
            .find(|t| t.ggml() == dtype)
    }

    pub(crate) fn ggml(self) -> GgmlDType {
        match self {
            QuantType::F32 => GgmlDType::F32,
            QuantType::F16 => GgmlDType::F16,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q5_1 => GgmlDType::Q5_1,
            QuantType::Q2K => GgmlDType::Q2K,
            QuantType::Q3K => GgmlDType::Q3K,
            QuantType::Q4K => GgmlDType::Q4K,
            QuantType::Q5K => GgmlDType::Q5K,
            QuantType::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama-quantize's substitute when a row is not a multiple of the type's block width
    /// (k-quants need 256; SmolLM2's rows are 576 wide). Where llama.cpp picks IQ4_NL (for
    /// 2- and 3-bit k-quants), which candle cannot write, Q4_0 is used.
    fn fallback(self) -> QuantType {
        match self {
            QuantType::Q2K | QuantType::Q3K => QuantType::Q4_0,
            QuantType::Q4K => QuantType::Q5_0,
            QuantType::Q5K => QuantType::Q5_1,
            QuantType::Q6K => QuantType::Q8_0,
            other => other,
        }
    }

    /// GGUF's `general.file_type` for a model mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 7,
            QuantType::Q5_0 => 8,
            QuantType::Q5_1 => 9,
            QuantType::Q2K => 10,
            QuantType::Q3K => 12,
            QuantType::Q4K => 15,
            QuantType::Q5K => 17,
            QuantType::Q6K => 18,
        }
    }
}

/// What a quantization wrote.
#[derive(Debug, Clone, Serialize)]
pub struct QuantReport {
    /// Tensors per written type name.
    pub tensors_by_type: BTreeMap<String, usize>,
    /// Tensors that took the fallback type.
    pub fallbacks: usize,
    /// Bytes of tensor data.
    pub tensor_bytes: usize,
    /// Weights in all.
    pub weights: usize,
    /// Bits per weight over all tensors.
    pub bits_per_weight: f64,
}

/// Which type each tensor gets: `ty` for the matrices and, when set, `embedding` for the token
/// embedding and output layer (llama-quantize's `--token-embedding-type` / `--output-tensor-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mix {
    /// Type of the linear weights.
    pub ty: QuantType,
    /// Type of the token embedding and output layer (default: llama-quantize's choice).
    pub embedding: Option<QuantType>,
    /// llama-quantize's mix of a k-quant (see [`Mix::tensor_type_in`]): Q4_K_M / Q5_K_M,
    /// Q3_K_M, or (for q2_k) its Q2_K, which is a mix too.
    #[serde(default)]
    pub medium: bool,
}

impl From<QuantType> for Mix {
    fn from(ty: QuantType) -> Mix {
        Mix {
            ty,
            embedding: None,
            medium: false,
        }
    }
}

impl Mix {
    /// The types whose llama-quantize mix `medium` writes.
    pub const MIXED: [QuantType; 4] = [
        QuantType::Q2K,
        QuantType::Q3K,
        QuantType::Q4K,
        QuantType::Q5K,
    ];

    /// The type of tensor `name` of shape `dims`, and whether it took the fallback.
    pub fn tensor_type(&self, name: &str, dims: &[usize]) -> (QuantType, bool) {
        tensor_type_with(name, dims, self.ty, self.embedding)
    }

    /// As [`Mix::tensor_type`], with the mix's choices for a model of `shape` — as
    /// llama-quantize makes them for llama-family models: the output layer in Q6_K and the
    /// token embedding in `ty`; then
    /// - Q4_K_M / Q5_K_M: `attn_v` and `ffn_down` in Q6_K in the layers llama.cpp's
    ///   `use_more_bits` picks (the first and last eighth, and every third layer between);
    /// - Q3_K_M: `attn_v` in Q5_K in the first two layers and Q4_K after, `ffn_down` in Q5_K in
    ///   the first sixteenth and Q4_K after, `attn_output` in Q4_K;
    /// - Q2_K: `attn_v` in Q4_K (Q3_K with fewer than 4 query heads per KV head), `ffn_down`
    ///   and `attn_output` in Q3_K.
    pub fn tensor_type_in(
        &self,
        name: &str,
        dims: &[usize],
        shape: &LlamaConfig,
    ) -> (QuantType, bool) {
        match self.medium_type(name, shape) {
            Some(ty) if dims.len() >= 2 => tensor_type_with(name, dims, ty, Some(ty)),
            _ => self.tensor_type(name, dims),
        }
    }

    /// Refuses a mix llama-quantize has no rules for.
    pub fn check(&self) -> Result<()> {
        if self.medium && !Mix::MIXED.contains(&self.ty) {
            return Err(Error::Config(format!(
                "the mixes are llama-quantize's Q2_K, Q3_K_M, Q4_K_M and Q5_K_M: --type q2_k, q3_k, q4_k or q5_k, not {}",
                self.ty.name()
            )));
        }
        Ok(())
    }

    fn medium_type(&self, name: &str, shape: &LlamaConfig) -> Option<QuantType> {
        if !self.medium {
            return None;
        }
        if name == "output.weight" {
            return Some(QuantType::Q6K);
        }
        if name == "token_embd.weight" {
            return Some(self.embedding.unwrap_or(self.ty));
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, tensor) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let n_layer = shape.n_layer;
        let eighth = n_layer / 8;
        let more_bits = layer < eighth || layer >= 7 * n_layer / 8 || (layer - eighth) % 3 == 2;
        let gqa = shape.n_head / shape.n_head_kv.max(1);
        use QuantType::{Q3K, Q4K, Q5K, Q6K};
        match (self.ty, tensor) {
            (Q4K | Q5K, "attn_v.weight" | "ffn_down.weight") => more_bits.then_some(Q6K),
            (Q3K, "attn_v.weight") => Some(if layer < 2 { Q5K } else { Q4K }),
            (Q3K, "ffn_down.weight") => Some(if layer < n_layer / 16 { Q5K } else { Q4K }),
            (Q3K, "attn_output.weight") => Some(Q4K),
            (QuantType::Q2K, "attn_v.weight") => Some(if gqa >= 4 { Q4K } else { Q3K }),
            (QuantType::Q2K, "ffn_down.weight" | "attn_output.weight") => Some(Q3K),
            _ => None,
        }
    }
}

/// The type each tensor gets: 1-D tensors stay f32; the token embedding (tied output) takes
/// Q8_0 unless `ty` is wider (llama-quantize asks Q6_K for the output, which falls back to Q8_0
/// on 576-wide rows); every other matrix gets `ty`, or its fallback when its rows do not fit.
pub fn tensor_type(name: &str, dims: &[usize], ty: QuantType) -> (QuantType, bool) {
    tensor_type_with(name, dims, ty, None)
}

fn tensor_type_with(
    name: &str,
    dims: &[usize],
    ty: QuantType,
    embedding: Option<QuantType>,
) -> (QuantType, bool) {
    if dims.len() < 2 {
        return (QuantType::F32, false);
    }
    let wanted = if name == "token_embd.weight" || name == "output.weight" {
        match (embedding, ty) {
            (Some(e), _) => e,
            (None, QuantType::F32 | QuantType::F16 | QuantType::Q8_0) => ty,
            (None, _) => QuantType::Q8_0,
        }
    } else {
        ty
    };
    let row = *dims.last().unwrap_or(&0);
    if !row.is_multiple_of(wanted.ggml().block_size()) {
        (wanted.fallback(), true)
    } else {
        (wanted, false)
    }
}

/// Quantizes every tensor of `base` with round-to-nearest into `path`.
pub fn quantize_rtn(base: &BaseWeights, mix: impl Into<Mix>, path: &Path) -> Result<QuantReport> {
    let mix = mix.into();
    mix.check()?;
    let mut tensors = Vec::with_capacity(base.names().len());
    for name in base.names() {
        let t = base.get(name)?;
        let (chosen, fell_back) = mix.tensor_type_in(name, t.dims(), &base.config);
        let q = QTensor::quantize(t, chosen.ggml())?;
        tensors.push(Quantized {
            name: name.clone(),
            tensor: q,
            ty: chosen,
            fell_back,
        });
    }
    write_quantized(base, Some(mix.ty), tensors, path)
}

/// Writes `weights` over the file it was read from (`weights.path`, e.g. a merged fine-tune
/// of that file): the tensors named in `changed` are quantized to `mix` by round-to-nearest,
/// every other tensor is copied from the file as it is, its blocks bit-exact. The file type
/// stays the file's. A fine-tune's small change survives this where re-quantizing the whole
/// dequantized model would bury it in rounding noise.
pub fn quantize_rtn_onto(
    weights: &BaseWeights,
    changed: &BTreeSet<String>,
    mix: impl Into<Mix>,
    path: &Path,
) -> Result<QuantReport> {
    let mix = mix.into();
    mix.check()?;
    let source = &weights.path;
    let gguf_error = |message: String| Error::Gguf {
        path: source.clone(),
        message,
    };
    let file = std::fs::File::open(source).map_err(Error::io(source))?;
    let mut reader = std::io::BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| gguf_error(format!("not a readable GGUF file: {e}")))?;
    if let Some(name) = changed.iter().find(|n| !weights.names().contains(n)) {
        return Err(gguf_error(format!("no tensor `{name}` to replace")));
    }
    let mut tensors = Vec::with_capacity(weights.names().len());
    for name in weights.names() {
        let t = weights.get(name)?;
        let (tensor, ty, fell_back) = if changed.contains(name) {
            let (chosen, fell_back) = mix.tensor_type_in(name, t.dims(), &weights.config);
            (QTensor::quantize(t, chosen.ggml())?, chosen, fell_back)
        } else {
            let q = content
                .tensor(&mut reader, name, &Device::Cpu)
                .map_err(|e| gguf_error(format!("tensor `{name}`: {e}")))?;
            if q.shape().dims() != t.dims() {
                return Err(gguf_error(format!(
                    "tensor `{name}` is {:?} in the file, {:?} in the model",
                    q.shape().dims(),
                    t.dims()
                )));
            }
            let ty = QuantType::of_ggml(q.dtype()).ok_or_else(|| {
                gguf_error(format!(
                    "tensor `{name}`: type {:?} cannot be copied",
                    q.dtype()
                ))
            })?;
            (q, ty, false)
        };
        tensors.push(Quantized {
            name: name.clone(),
            tensor,
            ty,
            fell_back,
        });
    }
    write_quantized(weights, None, tensors, path)
}

/// One tensor as written.
pub(crate) struct Quantized {
    pub name: String,
    pub tensor: QTensor,
    pub ty: QuantType,
    pub fell_back: bool,
}

/// Writes `tensors` with `base`'s metadata (file type set to `ty`'s, when given) and reports
/// on them.
pub(crate) fn write_quantized(
    base: &BaseWeights,
    ty: Option<QuantType>,
    tensors: Vec<Quantized>,
    path: &Path,
) -> Result<QuantReport> {
    let mut report = QuantReport {
        tensors_by_type: BTreeMap::new(),
        fallbacks: 0,
        tensor_bytes: 0,
        weights: 0,
        bits_per_weight: 0.0,
    };
    let mut written = Vec::with_capacity(tensors.len());
    for q in tensors {
        report.fallbacks += usize::from(q.fell_back);
        *report
            .tensors_by_type
            .entry(q.ty.name().to_string())
            .or_default() += 1;
        report.tensor_bytes += q.tensor.storage_size_in_bytes();
        report.weights += q.tensor.shape().elem_count();
        written.push((q.name, q.tensor));
    }
    report.bits_per_weight = report.tensor_bytes as f64 * 8.0 / report.weights.max(1) as f64;
    let mut metadata = base.metadata.clone();
    if let Some(ty) = ty {
        match metadata.iter_mut().find(|(k, _)| k == "general.file_type") {
            Some(slot) => slot.1 = Value::U32(ty.file_type()),
            None => metadata.push(("general.file_type".into(), Value::U32(ty.file_type()))),
        }
    }
    crate::export::write_gguf(path, &metadata, &written)?;
    Ok(report)
}

impl std::str::FromStr for QuantType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        QuantType::from_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-1.5B's shape: 28 layers, 12 query heads over 2 KV heads.
    fn qwen_shape() -> LlamaConfig {
        LlamaConfig {
            architecture: crate::Architecture::Qwen2,
            qkv_bias: true,
            n_layer: 28,
            n_embd: 1536,
            n_ff: 8960,
            n_head: 12,
            n_head_kv: 2,
            n_embd_head: 128,
            n_vocab: 151936,
            rms_eps: 1e-6,
            rope_base: 1e6,
        }
    }

    fn mixed(ty: QuantType) -> Mix {
        Mix {
            ty,
            embedding: None,
            medium: true,
        }
    }

    #[test]
    fn the_medium_mix_widens_the_layers_llama_quantize_picks() {
        let (mix, shape) = (mixed(QuantType::Q4K), qwen_shape());
        let dims = [1536, 1536];
        let wide = |name: &str| mix.tensor_type_in(name, &dims, &shape).0 == QuantType::Q6K;
        // 28 layers: 0–2, 24–27 and 5, 8, …, 23 take more bits (14 layers), as in the shipped
        // Qwen2.5 Q4_K_M file (29 Q6_K tensors with the output layer).
        let picked: Vec<usize> = (0..28)
            .filter(|i| wide(&format!("blk.{i}.attn_v.weight")))
            .collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
        );
        assert!(wide("blk.5.ffn_down.weight") && !wide("blk.5.attn_q.weight"));
        assert!(wide("output.weight"));
        let ty = |mix: &Mix, name: &str| mix.tensor_type_in(name, &dims, &shape).0;
        assert_eq!(ty(&mix, "token_embd.weight"), QuantType::Q4K);
        assert_eq!(
            mix.tensor_type_in("blk.0.attn_norm.weight", &[1536], &shape)
                .0,
            QuantType::F32
        );
    }

    #[test]
    fn the_3_and_2_bit_mixes_follow_llama_quantizes_q3_k_m_and_q2_k() {
        use QuantType::{Q2K, Q3K, Q4K, Q5K, Q6K};
        let (q3, q2, shape) = (mixed(Q3K), mixed(Q2K), qwen_shape());
        let ty = |mix: &Mix, name: &str| mix.tensor_type_in(name, &[1536, 1536], &shape).0;
        // Q3_K_M: attn_v Q5_K in layers 0–1 then Q4_K; ffn_down Q5_K in the first 28/16 = 1
        // layer then Q4_K; attn_output Q4_K; the rest Q3_K, the output layer Q6_K.
        for (name, want) in [
            ("blk.1.attn_v.weight", Q5K),
            ("blk.2.attn_v.weight", Q4K),
            ("blk.0.ffn_down.weight", Q5K),
            ("blk.1.ffn_down.weight", Q4K),
            ("blk.9.attn_output.weight", Q4K),
            ("blk.9.ffn_up.weight", Q3K),
            ("blk.9.attn_q.weight", Q3K),
            ("output.weight", Q6K),
            ("token_embd.weight", Q3K),
        ] {
            assert_eq!(ty(&q3, name), want, "q3_k_m {name}");
        }
        // Q2_K: with 6 query heads per KV head, attn_v Q4_K; ffn_down and attn_output Q3_K.
        for (name, want) in [
            ("blk.0.attn_v.weight", Q4K),
            ("blk.27.ffn_down.weight", Q3K),
            ("blk.3.attn_output.weight", Q3K),
            ("blk.3.ffn_gate.weight", Q2K),
            ("output.weight", Q6K),
        ] {
            assert_eq!(ty(&q2, name), want, "q2_k {name}");
        }
        let no_gqa = LlamaConfig {
            n_head_kv: 12,
            ..shape.clone()
        };
        assert_eq!(
            q2.tensor_type_in("blk.0.attn_v.weight", &[1536, 1536], &no_gqa)
                .0,
            Q3K
        );
        assert!(mixed(QuantType::Q4_0).check().is_err() && q2.check().is_ok());
    }

    #[test]
    fn tensor_rules_follow_llama_quantize() {
        assert_eq!(
            tensor_type("blk.0.attn_norm.weight", &[576], QuantType::Q4_0).0,
            QuantType::F32
        );
        assert_eq!(
            tensor_type("token_embd.weight", &[49152, 576], QuantType::Q4_0).0,
            QuantType::Q8_0
        );
        assert_eq!(
            tensor_type("token_embd.weight", &[49152, 576], QuantType::F16).0,
            QuantType::F16
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", &[576, 576], QuantType::Q4_0),
            (QuantType::Q4_0, false)
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", &[576, 576], QuantType::Q4K),
            (QuantType::Q5_0, true)
        );
        // ffn_down's rows are 1536 wide: k-quants fit.
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[576, 1536], QuantType::Q4K),
            (QuantType::Q4K, false)
        );
        for (name, t) in QuantType::ALL {
            assert_eq!(QuantType::from_name(name).unwrap(), t);
            assert_eq!(t.name(), name);
        }
        assert!(QuantType::from_name("q3_k_m").is_err());
        let mix = Mix {
            ty: QuantType::Q4_0,
            embedding: Some(QuantType::Q4_0),
            medium: false,
        };
        assert_eq!(
            mix.tensor_type("token_embd.weight", &[49152, 576]).0,
            QuantType::Q4_0
        );
        assert_eq!(
            mix.tensor_type("blk.0.attn_norm.weight", &[576]).0,
            QuantType::F32
        );
    }
}
