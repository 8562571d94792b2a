//! Adapter layers: LoRA, MoSLoRA, LoRETTA_rep (tensor-train factors) and LoRETTA_adp (a
//! tensor-train bottleneck after the MLP). Each holds its trainable [`Var`]s by name.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::init::Rng;
use crate::{Error, Result};

/// Which adapter to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    /// y = W₀x + (α/r)·B·A·x.
    Lora,
    /// y = W₀x + (α/r)·B·M·A·x with a learnable r×r mixer M (Wu et al., EMNLP 2024).
    Moslora,
    /// LoRA whose A and B are tensor-trains of small cores (Yang et al., NAACL 2024).
    LorettaRep,
    /// A tensor-train bottleneck adapter h + s·up(ReLU(down(h))) after each MLP.
    LorettaAdp,
}

impl AdapterKind {
    /// Every kind, in the order results are reported.
    pub const ALL: [AdapterKind; 4] = [
        AdapterKind::Lora,
        AdapterKind::Moslora,
        AdapterKind::LorettaRep,
        AdapterKind::LorettaAdp,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Lora => "lora",
            AdapterKind::Moslora => "moslora",
            AdapterKind::LorettaRep => "loretta-rep",
            AdapterKind::LorettaAdp => "loretta-adp",
        }
    }

    /// Parses [`AdapterKind::name`].
    pub fn from_name(name: &str) -> Result<AdapterKind> {
        AdapterKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown adapter `{name}` (expected lora, moslora, loretta-rep or loretta-adp)"
                ))
            })
    }
}

/// A linear layer of a transformer block that an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl Target {
    /// All seven, the default target set.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Short name (`q`, `gate`, …) as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    /// Parses [`Target::name`] (also accepts PEFT's `q_proj` style).
    pub fn from_name(name: &str) -> Result<Target> {
        let short = name.trim().trim_end_matches("_proj");
        Target::ALL
            .into_iter()
            .find(|t| t.name() == short)
            .ok_or_else(|| Error::Config(format!("unknown target module `{name}`")))
    }

    /// The GGUF tensor stem (`attn_q`, `ffn_gate`, …).
    pub fn gguf(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// The Hugging Face module path inside a llama block (`self_attn.q_proj`, `mlp.up_proj`, …).
    pub fn hf(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }
}

/// How MoSLoRA's mixer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MixerInit {
    /// Kaiming-uniform, the paper's default.
    #[default]
    Kaiming,
    /// A random orthogonal matrix.
    Orthogonal,
}

/// Everything that defines an adapter's shape and initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Which adapter.
    pub kind: AdapterKind,
    /// LoRA rank r (LoRETTA_adp: the bottleneck width).
    pub rank: usize,
    /// Scale numerator: updates are multiplied by α/r.
    pub alpha: f64,
    /// Linear layers that get an adapter (not used by LoRETTA_adp).
    pub targets: Vec<Target>,
    /// Tensor-train rank of the LoRETTA cores.
    pub tt_rank: usize,
    /// MoSLoRA's mixer initialisation.
    pub mixer_init: MixerInit,
    /// Seed of every random initialisation.
    pub seed: u64,
    /// Adapters on the top N layers only (0 = every layer). Training then runs no backward
    /// pass below them and computes the frozen lower layers' output once per example.
    #[serde(default)]
    pub top_layers: usize,
}

impl AdapterConfig {
    /// The defaults for `kind`: r = 16, α = 32, all seven targets, TT rank 5.
    pub fn new(kind: AdapterKind) -> AdapterConfig {
        AdapterConfig {
            kind,
            rank: 16,
            alpha: 32.0,
            targets: Target::ALL.to_vec(),
            tt_rank: 5,
            mixer_init: MixerInit::Kaiming,
            seed: 42,
            top_layers: 0,
        }
    }

    /// The first layer that carries an adapter in a model of `n_layer` layers.
    pub fn first_layer(&self, n_layer: usize) -> usize {
        match self.top_layers {
            0 => 0,
            n => n_layer.saturating_sub(n),
        }
    }

    /// α/r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Config("rank must be at least 1".into()));
        }
        if self.tt_rank == 0 {
            return Err(Error::Config("tensor-train rank must be at least 1".into()));
        }
        if self.kind != AdapterKind::LorettaAdp && self.targets.is_empty() {
            return Err(Error::Config("no target module given".into()));
        }
        Ok(())
    }
}

/// A matrix stored as a tensor-train: its dimensions are factored into modes
/// `rows = r₁·…·r_a`, `cols = c₁·…·c_b` and the tensor of shape (r₁,…,r_a,c₁,…,c_b) is a chain
/// of cores `G_k` of shape `[ρ_{k-1}, n_k, ρ_k]` with ρ₀ = ρ_end = 1.
#[derive(Debug, Clone)]
pub struct TtMatrix {
    rows: usize,
    cols: usize,
    cores: Vec<Var>,
}

impl TtMatrix {
    /// A random TT matrix whose full entries have about the given standard deviation; with
    /// `zero_last` the last core is zero (so the matrix starts at zero, like LoRA's B) and `std`
    /// sizes the other cores: with unit scale there, updates to the last core move the full
    /// matrix as fast as LoRA's B moves.
    pub fn new(
        rows: usize,
        cols: usize,
        tt_rank: usize,
        std: f64,
        zero_last: bool,
        rng: &mut Rng,
    ) -> Result<TtMatrix> {
        let mut modes = factor_modes(rows, 2);
        modes.extend(factor_modes(cols, 3));
        let d = modes.len();
        let ranks: Vec<usize> = (0..=d)
            .map(|k| if k == 0 || k == d { 1 } else { tt_rank })
            .collect();
        // Var(entry) = Π σ_k² · Π internal ranks; spread the target evenly over the cores.
        let internal: f64 = ranks[1..d].iter().map(|&r| r as f64).product();
        let core_std = (std * std / internal).powf(0.5 / d as f64);
        let mut cores = Vec::with_capacity(d);
        for k in 0..d {
            let shape = [ranks[k], modes[k], ranks[k + 1]];
            let t = if zero_last && k == d - 1 {
                Tensor::zeros(
                    &shape[..],
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?
            } else {
                rng.normal_tensor(&shape, core_std)?
            };
            cores.push(Var::from_tensor(&t)?);
        }
        Ok(TtMatrix { rows, cols, cores })
    }

    /// The full `[rows, cols]` matrix, contracted core by core (differentiable).
    pub fn full(&self) -> Result<Tensor> {
        let mut t = self.cores[0].as_tensor().clone();
        let (_, n0, r1) = t.dims3()?;
        t = t.reshape((n0, r1))?;
        for core in &self.cores[1..] {
            let (r, n, r_next) = core.dims3()?;
            let lead = t.dim(0)?;
            t = t
                .matmul(&core.as_tensor().reshape((r, n * r_next))?)?
                .reshape((lead * n, r_next))?;
        }
        Ok(t.reshape((self.rows, self.cols))?)
    }

    /// Number of trainable weights.
    pub fn parameter_count(&self) -> usize {
        self.cores.iter().map(|c| c.elem_count()).sum()
    }

    fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        for (k, c) in self.cores.iter().enumerate() {
            out.push((format!("{prefix}.core{k}"), c.clone()));
        }
    }
}

/// Splits `n` into at most `max_modes` factors of similar size (576 → 6·8·12, 1536 →
/// 8·12·16); primes stay whole.
pub fn factor_modes(n: usize, max_modes: usize) -> Vec<usize> {
    let mut primes = Vec::new();
    let mut m = n;
    let mut p = 2;
    while p * p <= m {
        while m.is_multiple_of(p) {
            primes.push(p);
            m /= p;
        }
        p += 1;
    }
    if m > 1 {
        primes.push(m);
    }
    if primes.is_empty() {
        return vec![n.max(1)];
    }
    // Largest primes first, each into the bin with the smallest product so far.
    primes.sort_unstable_by(|a, b| b.cmp(a));
    let mut bins = vec![1usize; max_modes.max(1).min(primes.len())];
    for p in primes {
        let smallest = (0..bins.len()).min_by_key(|&i| bins[i]).unwrap_or(0);
        bins[smallest] *= p;
    }
    bins.sort_unstable();
    bins
}

/// The low-rank update attached to one linear layer W₀ (shape `[out, in]`).
#[derive(Debug, Clone)]
pub enum LinearDelta {
    /// A `[r, in]`, B `[out, r]`.
    Lora {
        /// Down projection.
        a: Var,
        /// Up projection (starts at zero).
        b: Var,
        /// α/r.
        scale: f64,
    },
    /// A, the r×r mixer M, B.
    Moslora {
        /// Down projection.
        a: Var,
        /// Mixer.
        m: Var,
        /// Up projection (starts at zero).
        b: Var,
        /// α/r.
        scale: f64,
    },
    /// A and B as tensor-trains.
    Loretta {
        /// Down projection `[r, in]`.
        a: TtMatrix,
        /// Up projection `[out, r]` (last core starts at zero).
        b: TtMatrix,
        /// α/r.
        scale: f64,
    },
}

impl LinearDelta {
    /// A fresh update for a layer with `in_dim` inputs and `out_dim` outputs.
    pub fn new(
        config: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut Rng,
    ) -> Result<LinearDelta> {
        let r = config.rank;
        let zeros = |rows, cols| {
            Var::zeros(
                (rows, cols),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
        };
        let scale = config.scale();
        Ok(match config.kind {
            AdapterKind::Lora => LinearDelta::Lora {
                a: Var::from_tensor(&rng.kaiming_uniform(r, in_dim)?)?,
                b: zeros(out_dim, r)?,
                scale,
            },
            AdapterKind::Moslora => LinearDelta::Moslora {
                a: Var::from_tensor(&rng.kaiming_uniform(r, in_dim)?)?,
                m: Var::from_tensor(&match config.mixer_init {
                    MixerInit::Kaiming => rng.kaiming_uniform(r, r)?,
                    MixerInit::Orthogonal => rng.orthogonal(r)?,
                })?,
                b: zeros(out_dim, r)?,
                scale,
            },
            AdapterKind::LorettaRep => LinearDelta::Loretta {
                // U(±1/√in) has standard deviation 1/√(3·in).
                a: TtMatrix::new(
                    r,
                    in_dim,
                    config.tt_rank,
                    1.0 / (3.0 * in_dim as f64).sqrt(),
                    false,
                    rng,
                )?,
                b: TtMatrix::new(out_dim, r, config.tt_rank, 1.0, true, rng)?,
                scale,
            },
            AdapterKind::LorettaAdp => {
                return Err(Error::Config(
                    "LoRETTA_adp is a bottleneck after the MLP, not a linear update".into(),
                ))
            }
        })
    }

    /// The update as LoRA factors with the scale left out: (A `[r, in]`, B `[out, r]`) with
    /// ΔW = (α/r)·B·A. MoSLoRA's mixer is folded into A; LoRETTA's cores are contracted.
    pub fn lora_factors(&self) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            LinearDelta::Lora { a, b, .. } => (a.as_tensor().clone(), b.as_tensor().clone()),
            LinearDelta::Moslora { a, m, b, .. } => {
                (m.as_tensor().matmul(a.as_tensor())?, b.as_tensor().clone())
            }
            LinearDelta::Loretta { a, b, .. } => (a.full()?, b.full()?),
        })
    }

    /// α/r.
    pub fn scale(&self) -> f64 {
        match self {
            LinearDelta::Lora { scale, .. }
            | LinearDelta::Moslora { scale, .. }
            | LinearDelta::Loretta { scale, .. } => *scale,
        }
    }

    /// ΔW `[out, in]`, the amount to add to W₀ when merging: a plain tensor, outside the
    /// gradient graph (built on the trainable factors, a merged weight would keep ΔW and the
    /// unscaled product alive through its graph — on the 1.5B, 7.8 GB more than the merge).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (a, b) = self.lora_factors()?;
        let a = (a.detach() * self.scale())?;
        Ok(b.detach().matmul(&a)?)
    }

    /// The trainable variables, named under `prefix`.
    pub fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        match self {
            LinearDelta::Lora { a, b, .. } => {
                out.push((format!("{prefix}.lora_a"), a.clone()));
                out.push((format!("{prefix}.lora_b"), b.clone()));
            }
            LinearDelta::Moslora { a, m, b, .. } => {
                out.push((format!("{prefix}.lora_a"), a.clone()));
                out.push((format!("{prefix}.mixer"), m.clone()));
                out.push((format!("{prefix}.lora_b"), b.clone()));
            }
            LinearDelta::Loretta { a, b, .. } => {
                a.named_vars(&format!("{prefix}.lora_a"), out);
                b.named_vars(&format!("{prefix}.lora_b"), out);
            }
        }
    }
}

/// LoRETTA_adp: `h + s·up(ReLU(down(h)))` with `down` `[bottleneck, n_embd]` and `up`
/// `[n_embd, bottleneck]` as tensor-trains; `up` starts at zero so the model starts unchanged.
#[derive(Debug, Clone)]
pub struct TtBottleneck {
    down: TtMatrix,
    up: TtMatrix,
    scale: f64,
}

impl TtBottleneck {
    /// A fresh bottleneck on a hidden size of `n_embd`.
    pub fn new(config: &AdapterConfig, n_embd: usize, rng: &mut Rng) -> Result<TtBottleneck> {
        Ok(TtBottleneck {
            down: TtMatrix::new(
                config.rank,
                n_embd,
                config.tt_rank,
                1.0 / (3.0 * n_embd as f64).sqrt(),
                false,
                rng,
            )?,
            up: TtMatrix::new(n_embd, config.rank, config.tt_rank, 1.0, true, rng)?,
            scale: config.scale(),
        })
    }

    /// Applies the adapter to `h` of shape `[n, n_embd]`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let z = h.matmul(&self.down.full()?.t()?)?.relu()?;
        Ok((h + (z.matmul(&self.up.full()?.t()?)? * self.scale)?)?)
    }

    /// The trainable variables, named under `prefix`.
    pub fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        self.down.named_vars(&format!("{prefix}.down"), out);
        self.up.named_vars(&format!("{prefix}.up"), out);
    }
}

impl std::str::FromStr for AdapterKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AdapterKind::from_name(s)
    }
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Target::from_name(s)
    }
}

impl std::str::FromStr for MixerInit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kaiming" => Ok(MixerInit::Kaiming),
            "orthogonal" => Ok(MixerInit::Orthogonal),
            other => Err(Error::Config(format!(
                "unknown mixer init `{other}` (kaiming or orthogonal)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
