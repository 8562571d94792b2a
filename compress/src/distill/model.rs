//! The student of learned quantization: every linear weight fake-quantized with learnable
//! scales, and how it is written as GGUF.

use super::*;

/// One fake-quantized linear weight.
pub(super) struct QuantLinear {
    pub(super) name: String,
    pub(super) layer: usize,
    pub(super) target: Target,
    /// The f32 weight: the base's own tensor, or with QAT the variable's.
    pub(super) weight: Tensor,
    /// The weight as a variable the optimizer trains (QAT only: otherwise no copy is made).
    pub(super) weight_var: Option<Var>,
    pub(super) grid: QuantGrid,
    pub(super) gamma: Var,
    pub(super) beta: Var,
    pub(super) fell_back: bool,
}

/// A model whose linear weights carry learnable quantization scales.
pub struct LearnedModel {
    pub(super) config: LearnedConfig,
    pub(super) linears: Vec<QuantLinear>,
    /// Linear weights the mix gives a type learned scales do not cover (the mixes' q5_k and
    /// q6_k), dequantized from their round-to-nearest blocks.
    pub(super) fixed_linears: HashMap<(usize, Target), Tensor>,
    /// The token embedding (and tied output) as written, and dequantized.
    pub(super) embedding: (QTensor, Tensor),
    /// A separate output matrix, when the model has one.
    pub(super) output: Option<(QTensor, Tensor)>,
}

impl std::fmt::Debug for LearnedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LearnedModel")
            .field("config", &self.config)
            .field("linears", &self.linears.len())
            .finish()
    }
}

/// A tensor the mix quantizes once and keeps fixed (the token embedding, the output layer),
/// as written and dequantized: by round-to-nearest, or for the output layer of an imatrix
/// start, by the importance-weighted search over its input `columns` when its type has a grid
/// (llama.cpp does not weigh the token embedding, whose input is a one-hot row).
fn fixed_tensor(
    base: &BaseWeights,
    config: &LearnedConfig,
    name: &str,
    columns: Option<&[f32]>,
) -> Result<(QTensor, Tensor)> {
    let t = base.get(name)?;
    let (ty, _) = config.mix().tensor_type_in(name, t.dims(), &base.config);
    let q = match (columns, BlockFormat::of(ty)) {
        (Some(columns), Ok(format)) if config.init == ScaleInit::Imatrix => {
            let (rows, cols) = t.dims2()?;
            let mut grid = QuantGrid::new(format, Granularity::Block, rows, cols)?;
            let (gamma, beta) = grid.init_weighted(t, ScaleInit::Imatrix, Some(columns))?;
            grid.encode(t, &gamma, &beta)?
        }
        _ => QTensor::quantize(t, ty.ggml())?,
    };
    let d = q.dequantize(&Device::Cpu)?;
    Ok((q, d))
}

impl LearnedModel {
    /// Initial scales for every linear weight of `base`. Weights whose rows do not fit the
    /// type's block take llama-quantize's fallback (Q2_K → Q4_0), learned the same way; the
    /// embedding takes Q8_0 (in a mix: the base type) by round-to-nearest, as llama-quantize
    /// does, and so do a mix's q5_k / q6_k linears (kept fixed).
    pub fn new(base: &BaseWeights, config: &LearnedConfig) -> Result<LearnedModel> {
        LearnedModel::with_importance(base, config, None)
    }

    /// [`Self::new`] with the importance of each linear layer's inputs, which the
    /// [`ScaleInit::Imatrix`](crate::blocks::ScaleInit::Imatrix) start needs.
    pub fn with_importance(
        base: &BaseWeights,
        config: &LearnedConfig,
        importance: Option<&Importance>,
    ) -> Result<LearnedModel> {
        BlockFormat::of(config.ty)?;
        config.mix().check()?;
        let n_layer = base.config.n_layer;
        let mut linears = Vec::new();
        let mut fixed_linears = HashMap::new();
        for layer in 0..n_layer {
            for target in Target::ALL {
                let name = format!("blk.{layer}.{}.weight", target.gguf());
                let w = base.get(&name)?;
                let (ty, fell_back) = config.mix().tensor_type_in(&name, w.dims(), &base.config);
                let Ok(format) = BlockFormat::of(ty) else {
                    // A type learned scales do not cover (a mix's q5_k / q6_k): fixed, by rtn.
                    let q = QTensor::quantize(w, ty.ggml())?;
                    fixed_linears.insert((layer, target), q.dequantize(&Device::Cpu)?);
                    continue;
                };
                let (rows, cols) = w.dims2()?;
                let mut grid = QuantGrid::new(format, config.granularity, rows, cols)?;
                let columns = importance.and_then(|i| i.of(layer, target));
                let (gamma, beta) = grid.init_weighted(w, config.init, columns)?;
                let (weight, weight_var) = if config.train_weights {
                    let var = Var::from_tensor(w)?;
                    (var.as_tensor().clone(), Some(var))
                } else {
                    (w.clone(), None)
                };
                linears.push(QuantLinear {
                    name,
                    layer,
                    target,
                    weight,
                    weight_var,
                    grid,
                    gamma: Var::from_tensor(&gamma)?,
                    beta: Var::from_tensor(&beta)?,
                    fell_back,
                });
            }
        }
        let embedding = fixed_tensor(base, config, "token_embd.weight", None)?;
        let output = if base.names().iter().any(|n| n == "output.weight") {
            let columns = importance.map(Importance::output);
            Some(fixed_tensor(base, config, "output.weight", columns)?)
        } else {
            None
        };
        Ok(LearnedModel {
            config: config.clone(),
            linears,
            fixed_linears,
            embedding,
            output,
        })
    }

    /// The scale variables (γ, β) and the weight variables (QAT), by name.
    pub(super) fn vars(&self) -> (NamedVars, NamedVars) {
        let mut scales = Vec::new();
        let mut weights = Vec::new();
        for l in &self.linears {
            scales.push((format!("{}.gamma", l.name), l.gamma.clone()));
            if l.grid.format.offset {
                scales.push((format!("{}.beta", l.name), l.beta.clone()));
            }
            if let Some(var) = &l.weight_var {
                weights.push((l.name.clone(), var.clone()));
            }
        }
        (scales, weights)
    }

    /// The variables training changes: the scales, and the weights with QAT.
    pub(super) fn trained_vars(&self) -> NamedVars {
        let (mut scales, weights) = self.vars();
        if self.config.train_weights {
            scales.extend(weights);
        }
        scales
    }

    /// Learnable numbers under the configuration.
    pub fn learnable(&self) -> usize {
        let (scales, weights) = self.vars();
        let count = |v: &[(String, Var)]| v.iter().map(|(_, v)| v.elem_count()).sum::<usize>();
        count(&scales)
            + if self.config.train_weights {
                count(&weights)
            } else {
                0
            }
    }

    /// The quantized model as candle runs it (what the written file holds), built on `base`.
    pub fn student_model(&self, base: &BaseWeights) -> Result<AdaptedModel> {
        self.student(&AdaptedModel::new(base, None)?)
    }

    /// The student: `teacher` with fake-quantized linears and the quantized embedding.
    pub(super) fn student(&self, teacher: &AdaptedModel) -> Result<AdaptedModel> {
        let mut by_slot = HashMap::new();
        for l in &self.linears {
            by_slot.insert((l.layer, l.target), l);
        }
        let output = match &self.output {
            Some((_, o)) => o.clone(),
            None => self.embedding.1.clone(),
        };
        teacher.with_weights(
            Some((self.embedding.1.clone(), output)),
            |layer, target, _| {
                if let Some(dequantized) = self.fixed_linears.get(&(layer, target)) {
                    return Ok(dequantized.clone());
                }
                let l = by_slot.get(&(layer, target)).ok_or_else(|| {
                    Error::Config(format!("no grid for blk.{layer}.{}", target.gguf()))
                })?;
                l.grid.fake_quant(
                    &l.weight,
                    l.gamma.as_tensor(),
                    l.beta.as_tensor(),
                    self.config.train_weights,
                )
            },
        )
    }

    /// Writes the quantized model: learned linears, quantized embedding, f32 norms.
    pub fn write_gguf(&self, base: &BaseWeights, path: &Path) -> Result<QuantReport> {
        let mut tensors = Vec::with_capacity(base.names().len());
        for name in base.names() {
            let t = base.get(name)?;
            let q = if let Some(l) = self.linears.iter().find(|l| &l.name == name) {
                Quantized {
                    name: name.clone(),
                    tensor: l
                        .grid
                        .encode(&l.weight, l.gamma.as_tensor(), l.beta.as_tensor())?,
                    ty: l.grid.format.ty,
                    fell_back: l.fell_back,
                }
            } else {
                // Round-to-nearest, deterministic: a fixed linear is written as the student saw it.
                let (ty, fell_back) =
                    self.config
                        .mix()
                        .tensor_type_in(name, t.dims(), &base.config);
                let tensor = match (name.as_str(), &self.output) {
                    ("token_embd.weight", _) => QTensor::quantize(t, self.embedding.0.dtype())?,
                    ("output.weight", Some((o, _))) => QTensor::quantize(t, o.dtype())?,
                    _ => QTensor::quantize(t, ty.ggml())?,
                };
                Quantized {
                    name: name.clone(),
                    tensor,
                    ty,
                    fell_back,
                }
            };
            tensors.push(q);
        }
        write_quantized(base, Some(self.config.ty), tensors, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::Rng;
    use crate::{Architecture, LlamaConfig};
    use candle_core::quantized::GgmlDType;

    /// A model with no layers: a token embedding and an output layer of `vocab × n_embd`.
    fn embedding_and_output(vocab: usize, n_embd: usize) -> BaseWeights {
        let mut rng = Rng::new(5);
        let mut matrix = || {
            let v: Vec<f32> = (0..vocab * n_embd).map(|_| rng.uniform(0.1)).collect();
            Tensor::from_vec(v, (vocab, n_embd), &Device::Cpu).unwrap()
        };
        let tensors = HashMap::from([
            ("token_embd.weight".to_string(), matrix()),
            ("output.weight".to_string(), matrix()),
        ]);
        let config = LlamaConfig {
            architecture: Architecture::Llama,
            n_layer: 0,
            n_embd,
            n_ff: n_embd,
            n_head: 1,
            n_head_kv: 1,
            n_embd_head: n_embd,
            n_vocab: vocab,
            rms_eps: 1e-5,
            rope_base: 1e4,
            qkv_bias: false,
        };
        let names = vec!["token_embd.weight".into(), "output.weight".into()];
        BaseWeights::from_parts("memory".into(), config, vec![], tensors, names)
    }

    #[test]
    fn an_imatrix_start_weighs_the_output_layer_by_its_inputs() {
        let (vocab, n_embd) = (32, 512);
        let base = embedding_and_output(vocab, n_embd);
        let w = base.get("output.weight").unwrap();
        // A few loud columns of the final hidden states, as real models have.
        let columns: Vec<f32> = (0..n_embd)
            .map(|j| if j % 61 == 7 { 40.0 } else { 0.2 })
            .collect();
        let config = |init| LearnedConfig {
            ty: QuantType::Q2K,
            embedding: Some(QuantType::Q2K),
            init,
            ..LearnedConfig::default()
        };
        let weighted_error = |q: &Tensor| -> f32 {
            let sq: Vec<f32> = (w - q)
                .unwrap()
                .sqr()
                .unwrap()
                .sum(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            sq.iter().zip(&columns).map(|(e, a)| e * a).sum()
        };
        let rtn = fixed_tensor(
            &base,
            &config(ScaleInit::Mse),
            "output.weight",
            Some(&columns),
        );
        let (rtn_q, rtn_d) = rtn.unwrap();
        let ggml = QTensor::quantize(w, GgmlDType::Q2K).unwrap();
        assert_eq!(
            rtn_q.data().unwrap(),
            ggml.data().unwrap(),
            "without imatrix: rtn"
        );
        let (q, d) = fixed_tensor(
            &base,
            &config(ScaleInit::Imatrix),
            "output.weight",
            Some(&columns),
        )
        .unwrap();
        assert_eq!(q.dtype(), GgmlDType::Q2K);
        assert_eq!(d.dims(), w.dims());
        let (e_rtn, e_imatrix) = (weighted_error(&rtn_d), weighted_error(&d));
        assert!(
            e_imatrix < 0.8 * e_rtn,
            "imatrix {e_imatrix} against rtn {e_rtn}"
        );
    }
}
