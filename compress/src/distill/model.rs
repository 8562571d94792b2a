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
        let fixed = |name: &str| -> Result<(QTensor, Tensor)> {
            let t = base.get(name)?;
            let (ty, _) = config.mix().tensor_type_in(name, t.dims(), &base.config);
            let q = QTensor::quantize(t, ty.ggml())?;
            let d = q.dequantize(&Device::Cpu)?;
            Ok((q, d))
        };
        let embedding = fixed("token_embd.weight")?;
        let output = if base.names().iter().any(|n| n == "output.weight") {
            Some(fixed("output.weight")?)
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
