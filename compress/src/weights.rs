//! A GGUF model read into f32 candle tensors, with the metadata needed to write it back.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// The transformer families read: llama (SmolLM2, Llama, …), qwen2 (Qwen2, Qwen2.5) and deci
/// (llama with per-layer head counts and MLP widths: what [`crate::prune`] writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llama`: no biases; q/k rows permuted by the GGUF converter for interleaved RoPE.
    Llama,
    /// `qwen2`: biases on q, k and v; RoPE rotates the two halves of a head (NeoX style).
    Qwen2,
    /// `deci`: llama's layers, each with its own query/key-value head count and MLP width
    /// (llama.cpp reads them from per-layer arrays), interleaved RoPE, and q/k/v biases when
    /// the file has them (a pruned qwen2 model).
    Deci,
}

impl Architecture {
    /// The GGUF `general.architecture` name, also the prefix of its metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Deci => "deci",
        }
    }

    /// Whether RoPE rotates `(x[i], x[i + d/2])` (NeoX) rather than `(x[2i], x[2i+1])`.
    pub fn neox_rope(self) -> bool {
        self == Architecture::Qwen2
    }
}

impl std::str::FromStr for Architecture {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "deci" => Ok(Architecture::Deci),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// The shape of a llama-family transformer, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which family: biases and RoPE layout follow from it.
    pub architecture: Architecture,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// MLP inner size (the widest layer's, when layers differ).
    pub n_ff: usize,
    /// Query heads (the most any layer has, when layers differ).
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`; the most any layer
    /// has, when layers differ).
    pub n_head_kv: usize,
    /// Size of one attention head (`attention.key_length`, or `n_embd / n_head`).
    pub n_embd_head: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// RMS-norm epsilon.
    pub rms_eps: f64,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// Whether q, k and v carry biases (qwen2 always, llama never, deci when the file has them).
    pub qkv_bias: bool,
}

impl LlamaConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd_head
    }
}

/// Every tensor of a GGUF model dequantized to f32, plus its metadata.
pub struct BaseWeights {
    /// Where it was read from.
    pub path: PathBuf,
    /// The transformer's shape.
    pub config: LlamaConfig,
    /// Metadata in file order (tokenizer, chat template, …), kept for writing a merged model.
    pub metadata: Vec<(String, Value)>,
    tensors: HashMap<String, Tensor>,
    names: Vec<String>,
}

impl std::fmt::Debug for BaseWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseWeights")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("tensors", &self.names.len())
            .finish()
    }
}

impl BaseWeights {
    /// Reads and dequantizes a GGUF file (checked by [`geek_backend::gguf::GgufFile`] first),
    /// k-quant blocks included. The `llama` (SmolLM2, Llama, …) and `qwen2` (Qwen2.5)
    /// architectures are read; anything else is [`Error::UnsupportedArchitecture`].
    // Longer than 80 lines: reads the tensors in the order the architecture defines them (embedding, each layer's nine tensors and biases, norms, output), each with its presence check.
    pub fn load(path: impl AsRef<Path>) -> Result<BaseWeights> {
        let path = path.as_ref().to_path_buf();
        // The backend's reader validates what candle's trusts (sizes, shapes, alignment).
        geek_backend::gguf::GgufFile::open(&path)?;
        let file = File::open(&path).map_err(Error::io(&path))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::Gguf {
            path: path.clone(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        let meta = |key: &str| {
            content.metadata.get(key).ok_or_else(|| Error::Gguf {
                path: path.clone(),
                message: format!("metadata key `{key}` is missing"),
            })
        };
        let bad = |key: &str, e: candle_core::Error| Error::Gguf {
            path: path.clone(),
            message: format!("metadata key `{key}`: {e}"),
        };
        let architecture: Architecture = meta("general.architecture")?
            .to_string()
            .map_err(|e| bad("general.architecture", e))?
            .parse()?;
        let arch = architecture.name();
        // A number, or (deci) one per layer: the largest is the model's.
        let int = |key: &str| -> Result<usize> {
            let key = format!("{arch}.{key}");
            let key = key.as_str();
            let one = |v: &Value| {
                v.to_u32()
                    .map(|x| x as usize)
                    .or_else(|_| v.to_u64().map(|x| x as usize))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
                    .map_err(|e| bad(key, e))
            };
            match meta(key)? {
                Value::Array(items) => items.iter().map(one).try_fold(0, |m, x| Ok(m.max(x?))),
                v => one(v),
            }
        };
        let n_head = int("attention.head_count")?;
        let n_embd = int("embedding_length")?;
        let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        names.sort_by_key(|n| content.tensor_infos[n].offset);
        let mut tensors = HashMap::new();
        for name in &names {
            let q = content
                .tensor(&mut reader, name, &Device::Cpu)
                .map_err(|e| Error::Gguf {
                    path: path.clone(),
                    message: format!("tensor `{name}`: {e}"),
                })?;
            tensors.insert(name.clone(), q.dequantize(&Device::Cpu)?);
        }
        let n_vocab = tensors
            .get("token_embd.weight")
            .ok_or_else(|| Error::Gguf {
                path: path.clone(),
                message: "tensor `token_embd.weight` is missing".into(),
            })?
            .dim(0)?;
        let (eps_key, rope_key) = (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            format!("{arch}.rope.freq_base"),
        );
        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => false,
            Architecture::Deci => tensors.contains_key("blk.0.attn_q.bias"),
        };
        let config = LlamaConfig {
            architecture,
            qkv_bias,
            n_layer: int("block_count")?,
            n_embd,
            n_ff: int("feed_forward_length")?,
            n_head,
            n_head_kv: int("attention.head_count_kv").unwrap_or(n_head),
            n_embd_head: int("attention.key_length").unwrap_or(n_embd / n_head.max(1)),
            n_vocab,
            rms_eps: meta(&eps_key)?.to_f32().map_err(|e| bad(&eps_key, e))? as f64,
            rope_base: content
                .metadata
                .get(&rope_key)
                .map(|v| v.to_f32())
                .transpose()
                .map_err(|e| bad(&rope_key, e))?
                .unwrap_or(10_000.0),
        };
        let mut metadata: Vec<(String, Value)> = content.metadata.into_iter().collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        let weights = BaseWeights {
            path,
            config,
            metadata,
            tensors,
            names,
        };
        for i in 0..weights.config.n_layer {
            for t in [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                weights.get(&format!("blk.{i}.{t}.weight"))?;
            }
            if weights.config.qkv_bias {
                for t in ["attn_q", "attn_k", "attn_v"] {
                    weights.get(&format!("blk.{i}.{t}.bias"))?;
                }
            }
        }
        weights.get("output_norm.weight")?;
        Ok(weights)
    }

    /// The tensor called `name` (GGUF naming, e.g. `blk.0.attn_q.weight`).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            message: format!("tensor `{name}` is missing"),
        })
    }

    /// Tensor names in file order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The output projection: `output.weight`, or the token embedding when tied.
    pub fn output(&self) -> Result<&Tensor> {
        self.tensors
            .get("output.weight")
            .map(Ok)
            .unwrap_or_else(|| self.get("token_embd.weight"))
    }

    /// The same model with some tensors replaced (same names and shapes).
    pub fn with_tensors(&self, replaced: HashMap<String, Tensor>) -> Result<BaseWeights> {
        let mut tensors = self.tensors.clone();
        for (name, t) in replaced {
            match tensors.get(&name) {
                Some(old) if old.dims() == t.dims() => {
                    tensors.insert(name, t);
                }
                _ => {
                    return Err(Error::Config(format!(
                        "no tensor {name} of shape {:?} to replace",
                        t.dims()
                    )))
                }
            }
        }
        Ok(BaseWeights {
            path: self.path.clone(),
            config: self.config.clone(),
            metadata: self.metadata.clone(),
            tensors,
            names: self.names.clone(),
        })
    }

    /// A model made in memory (a pruned one): `tensors` written in the order of `names`.
    pub(crate) fn from_parts(
        path: PathBuf,
        config: LlamaConfig,
        metadata: Vec<(String, Value)>,
        tensors: HashMap<String, Tensor>,
        names: Vec<String>,
    ) -> BaseWeights {
        BaseWeights {
            path,
            config,
            metadata,
            tensors,
            names,
        }
    }

    /// Total number of weights.
    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }
}
