//! Which structures a pruned model keeps: scores per structure, the plans cut from them, and
//! what a plan costs in parameters.

use serde::{Deserialize, Serialize};

use crate::weights::LlamaConfig;
use crate::{BaseWeights, Result, Target};

/// Sizes that block-quantized types need: widths stay multiples of this.
pub const WIDTH_STEP: usize = 32;

/// A score per prunable structure (a learned mask value, or a weight norm): per layer per query
/// head, per layer per MLP channel, and per hidden dimension. Higher |score| = more important.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// `[layer][query head]`.
    pub heads: Vec<Vec<f32>>,
    /// `[layer][MLP channel]`.
    pub ffn: Vec<Vec<f32>>,
    /// `[hidden dimension]`.
    pub hidden: Vec<f32>,
}

impl Scores {
    /// Structured magnitude scores of `base`: the L2 norm of the weights each structure owns —
    /// a head's rows of q and columns of the output projection, a channel's rows of gate and up
    /// and column of down, a hidden dimension's column of the embedding and of every matrix
    /// reading the stream and its row of every matrix writing it.
    pub fn magnitude(base: &BaseWeights) -> Result<Scores> {
        let c = &base.config;
        let hd = c.head_dim();
        let col_sq =
            |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.sqr()?.sum(0)?.to_vec1()?) };
        let row_sq =
            |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.sqr()?.sum(1)?.to_vec1()?) };
        let add =
            |acc: &mut Vec<f32>, x: Vec<f32>| acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        let mut hidden = col_sq(base.get("token_embd.weight")?)?;
        let (mut heads, mut ffn) = (Vec::new(), Vec::new());
        for i in 0..c.n_layer {
            let w = |t: Target| base.get(&format!("blk.{i}.{}.weight", t.gguf()));
            let q_rows = row_sq(w(Target::Q)?)?;
            let o_cols = col_sq(w(Target::O)?)?;
            heads.push(
                (0..q_rows.len() / hd)
                    .map(|h| {
                        let s: f32 = (h * hd..(h + 1) * hd).map(|r| q_rows[r] + o_cols[r]).sum();
                        s.sqrt()
                    })
                    .collect(),
            );
            let mut channel = row_sq(w(Target::Gate)?)?;
            add(&mut channel, row_sq(w(Target::Up)?)?);
            add(&mut channel, col_sq(w(Target::Down)?)?);
            ffn.push(channel.into_iter().map(f32::sqrt).collect());
            for t in [Target::Q, Target::K, Target::V, Target::Gate, Target::Up] {
                add(&mut hidden, col_sq(w(t)?)?);
            }
            add(&mut hidden, row_sq(w(Target::O)?)?);
            add(&mut hidden, row_sq(w(Target::Down)?)?);
        }
        Ok(Scores {
            heads,
            ffn,
            hidden: hidden.into_iter().map(f32::sqrt).collect(),
        })
    }
}

/// What a pruned model keeps, as sorted indices into the original model's structures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Query heads kept, per layer (the same number in each kept key/value group).
    pub heads: Vec<Vec<usize>>,
    /// Key/value heads kept, per layer.
    pub kv_heads: Vec<Vec<usize>>,
    /// MLP channels kept, per layer (a multiple of [`WIDTH_STEP`]).
    pub ffn: Vec<Vec<usize>>,
    /// Hidden dimensions kept (a multiple of [`WIDTH_STEP`]).
    pub hidden: Vec<usize>,
}

/// Parameters of a model, by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParameterCount {
    /// q, k, v and output projections.
    pub attention: usize,
    /// gate, up and down projections.
    pub mlp: usize,
    /// RMS-norm weights.
    pub norms: usize,
    /// Token embedding (tied output, or the embedding and a separate output layer).
    pub embedding: usize,
}

impl ParameterCount {
    /// Everything but the embedding: what keep ratios are ratios of.
    pub fn non_embedding(&self) -> usize {
        self.attention + self.mlp + self.norms
    }

    /// All parameters.
    pub fn total(&self) -> usize {
        self.non_embedding() + self.embedding
    }
}

/// The indices of the `n` largest |score|, sorted by index.
fn top(scores: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()).then(a.cmp(&b)));
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

/// `n` rounded to the nearest multiple of [`WIDTH_STEP`], within `[WIDTH_STEP, max]`.
fn round_width(n: usize, max: usize) -> usize {
    let r = (n + WIDTH_STEP / 2) / WIDTH_STEP * WIDTH_STEP;
    r.clamp(WIDTH_STEP.min(max), max)
}

impl Plan {
    /// The whole model.
    pub fn full(config: &LlamaConfig) -> Plan {
        let all = |n: usize| (0..n).collect::<Vec<_>>();
        Plan {
            heads: vec![all(config.n_head); config.n_layer],
            kv_heads: vec![all(config.n_head_kv); config.n_layer],
            ffn: vec![all(config.n_ff); config.n_layer],
            hidden: all(config.n_embd),
        }
    }

    /// Keeps the heads of a layer: `wanted` query heads (by score) become whole key/value
    /// groups — groups none of whose heads are wanted go, the others keep the mean number of
    /// wanted heads per kept group (at least one), their best — so that every group has the
    /// same number of query heads, as llama.cpp's grouped attention needs.
    fn layer_heads(scores: &[f32], n_kv: usize, wanted: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let rep = scores.len() / n_kv;
        let per_group: Vec<usize> = (0..n_kv)
            .map(|g| wanted.iter().filter(|&&h| h / rep == g).count())
            .collect();
        let mut groups: Vec<usize> = (0..n_kv).filter(|&g| per_group[g] > 0).collect();
        if groups.is_empty() {
            let best = top(scores, 1)[0];
            groups.push(best / rep);
        }
        let total: usize = groups.iter().map(|&g| per_group[g]).sum();
        let k = ((total as f64 / groups.len() as f64).round() as usize).clamp(1, rep);
        let mut heads = Vec::new();
        for &g in &groups {
            let kept = top(&scores[g * rep..(g + 1) * rep], k);
            heads.extend(kept.into_iter().map(|h| g * rep + h));
        }
        (heads, groups)
    }

    /// Keeps every structure whose |score| is at least `threshold`, then rounds: widths to
    /// multiples of [`WIDTH_STEP`] (by score) and heads to whole, equal groups.
    pub fn by_threshold(scores: &Scores, config: &LlamaConfig, threshold: f32) -> Plan {
        let above = |s: &[f32]| s.iter().filter(|x| x.abs() >= threshold).count();
        let mut plan = Plan::full(config);
        for (i, s) in scores.heads.iter().enumerate() {
            let wanted = top(s, above(s));
            (plan.heads[i], plan.kv_heads[i]) = Plan::layer_heads(s, config.n_head_kv, &wanted);
        }
        for (i, s) in scores.ffn.iter().enumerate() {
            plan.ffn[i] = top(s, round_width(above(s), s.len()));
        }
        let h = &scores.hidden;
        plan.hidden = top(h, round_width(above(h), h.len()));
        plan
    }

    /// Keeps the same fraction `f` of every component — hidden dimensions, each layer's query
    /// heads and MLP channels — chosen by score (the magnitude baseline's allocation).
    pub fn uniform(scores: &Scores, config: &LlamaConfig, f: f64) -> Plan {
        let count = |n: usize| ((n as f64 * f).round() as usize).clamp(1, n);
        let mut plan = Plan::full(config);
        for (i, s) in scores.heads.iter().enumerate() {
            let wanted = top(s, count(s.len()));
            (plan.heads[i], plan.kv_heads[i]) = Plan::layer_heads(s, config.n_head_kv, &wanted);
        }
        for (i, s) in scores.ffn.iter().enumerate() {
            plan.ffn[i] = top(s, round_width(count(s.len()), s.len()));
        }
        let h = &scores.hidden;
        plan.hidden = top(h, round_width(count(h.len()), h.len()));
        plan
    }

    /// The largest plan of `make(x)` (x from 0 = keep most to 1 = keep least, the size
    /// falling as x grows) whose non-embedding parameters are at most `keep` of the model's.
    fn search(config: &LlamaConfig, keep: f64, make: impl Fn(f64) -> Plan) -> Plan {
        let target = keep * Plan::full(config).parameters(config).non_embedding() as f64;
        let fits = |p: &Plan| p.parameters(config).non_embedding() as f64 <= target;
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        if fits(&make(lo)) {
            return make(lo);
        }
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if fits(&make(mid)) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        make(hi)
    }

    /// The plan at the |score| threshold that keeps at most `keep` of the non-embedding
    /// parameters (the learned masks' extraction: one global threshold over all structures).
    pub fn for_keep(scores: &Scores, config: &LlamaConfig, keep: f64) -> Plan {
        let max = scores
            .heads
            .iter()
            .chain(&scores.ffn)
            .flatten()
            .chain(&scores.hidden)
            .fold(0.0f32, |m, x| m.max(x.abs()));
        Plan::search(config, keep, |x| {
            Plan::by_threshold(scores, config, (x as f32) * max * 1.0001)
        })
    }

    /// The uniform plan that keeps at most `keep` of the non-embedding parameters.
    pub fn uniform_for_keep(scores: &Scores, config: &LlamaConfig, keep: f64) -> Plan {
        Plan::search(config, keep, |x| Plan::uniform(scores, config, 1.0 - x))
    }

    /// Parameters of the model this plan makes of one shaped as `config` (tied output
    /// counted once; a separate output layer is not counted).
    pub fn parameters(&self, config: &LlamaConfig) -> ParameterCount {
        let (n, hd) = (self.hidden.len(), config.head_dim());
        let mut count = ParameterCount {
            attention: 0,
            mlp: 0,
            norms: n,
            embedding: config.n_vocab * n,
        };
        for i in 0..self.heads.len() {
            count.attention += n * hd * 2 * (self.heads[i].len() + self.kv_heads[i].len());
            count.mlp += 3 * n * self.ffn[i].len();
            count.norms += 2 * n;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Architecture;

    fn config() -> LlamaConfig {
        LlamaConfig {
            architecture: Architecture::Llama,
            qkv_bias: false,
            n_layer: 2,
            n_embd: 512,
            n_ff: 1024,
            n_head: 4,
            n_head_kv: 2,
            n_embd_head: 128,
            n_vocab: 10,
            rms_eps: 1e-5,
            rope_base: 1e4,
        }
    }

    fn scores(c: &LlamaConfig) -> Scores {
        let ramp = |n: usize, k: f32| (0..n).map(|i| k * (i + 1) as f32 / n as f32).collect();
        Scores {
            heads: vec![vec![0.1, 0.9, 0.8, 0.7], vec![0.9, 0.05, 0.02, 0.01]],
            ffn: vec![ramp(c.n_ff, 1.0), ramp(c.n_ff, 0.5)],
            hidden: ramp(c.n_embd, 1.0),
        }
    }

    #[test]
    fn heads_are_kept_in_whole_equal_groups() {
        let c = config();
        let plan = Plan::by_threshold(&scores(&c), &c, 0.5);
        // Layer 0 wants heads 1, 2, 3: both groups stay, with the best one each... rounded
        // from 1.5 to 2 per group.
        assert_eq!(plan.heads[0], vec![0, 1, 2, 3]);
        assert_eq!(plan.kv_heads[0], vec![0, 1]);
        // Layer 1 wants head 0 only: its group, one head.
        assert_eq!(plan.heads[1], vec![0]);
        assert_eq!(plan.kv_heads[1], vec![0]);
        assert!(plan
            .ffn
            .iter()
            .all(|f| f.len() % WIDTH_STEP == 0 && !f.is_empty()));
        assert_eq!(plan.hidden.len() % WIDTH_STEP, 0);
    }

    #[test]
    fn the_search_keeps_at_most_the_ratio_asked() {
        let c = config();
        let s = scores(&c);
        let full = Plan::full(&c).parameters(&c).non_embedding() as f64;
        for keep in [0.9, 0.75, 0.5] {
            for plan in [
                Plan::for_keep(&s, &c, keep),
                Plan::uniform_for_keep(&s, &c, keep),
            ] {
                let kept = plan.parameters(&c).non_embedding() as f64 / full;
                assert!(kept <= keep + 1e-9 && kept > keep - 0.1, "{keep}: {kept}");
            }
        }
        assert_eq!(Plan::for_keep(&s, &c, 1.0), Plan::full(&c));
    }
}
