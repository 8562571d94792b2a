//! Generation parameters and the per-request token sampler.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the next token is chosen. `temperature == 0` is greedy decoding (deterministic);
/// otherwise top-k, then top-p, then temperature, then a draw seeded by `seed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// 0 for greedy decoding.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: i32,
    /// Keep the smallest set of tokens whose probability mass reaches p (1 = all).
    pub top_p: f32,
    /// Penalty for repeating one of the last `repeat_last_n` tokens (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: i32,
    /// Seed of the random draw.
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Sampling::default()
    }

    /// Seeded random sampling at `temperature`.
    pub fn seeded(temperature: f32, seed: u32) -> Self {
        Sampling {
            temperature,
            seed,
            ..Sampling::default()
        }
    }

    /// Greedy decoding with nothing that depends on earlier choices but the grammar: what
    /// prompt-lookup drafting can verify exactly.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && self.repeat_penalty == 1.0
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidParameter(what.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if self.top_k < 0 {
            return bad("top_k must be >= 0");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty must be > 0");
        }
        Ok(())
    }
}

/// Everything a generation request can set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateParams {
    /// Stop after this many new tokens.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Stop as soon as the output contains one of these; the returned text ends before it.
    pub stop: Vec<String>,
    /// A GBNF grammar (root rule `root`) the output must follow.
    pub grammar: Option<String>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report the log-probability of each generated token and of the `logprobs` most likely
    /// tokens at its position (0: none).
    pub logprobs: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: Sampling::default(),
            stop: Vec::new(),
            grammar: None,
            ignore_eos: false,
            logprobs: 0,
        }
    }
}

impl GenerateParams {
    /// Greedy generation of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        GenerateParams {
            max_tokens,
            ..GenerateParams::default()
        }
    }

    /// Adds a stop string.
    pub fn stop_at(mut self, stop: impl Into<String>) -> Self {
        self.stop.push(stop.into());
        self
    }

    /// Constrains the output with a GBNF grammar.
    pub fn with_grammar(mut self, gbnf: impl Into<String>) -> Self {
        self.grammar = Some(gbnf.into());
        self
    }

    /// Uses these sampling settings.
    pub fn with_sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = sampling;
        self
    }
}

/// Picks tokens from a row of logits for one request. Greedy decoding without grammar or
/// penalties is a plain argmax; everything else goes through llama.cpp's samplers. A grammar is
/// checked on the chosen token first and applied to the whole vocabulary only when that token
/// is rejected, as llama.cpp's own `common_sampler` does.
pub(crate) struct TokenSampler {
    grammar: Option<LlamaSampler>,
    chain: Option<LlamaSampler>,
}

impl TokenSampler {
    pub(crate) fn new(model: &LlamaModel, params: &GenerateParams) -> Result<Self> {
        params.sampling.validate()?;
        let s = &params.sampling;
        let grammar = match &params.grammar {
            None => None,
            Some(g) if g.trim().is_empty() => {
                return Err(Error::Grammar("the grammar is empty".into()))
            }
            Some(g) => Some(LlamaSampler::grammar(model, g, "root").map_err(|e| {
                Error::Grammar(format!(
                    "{e}: llama.cpp could not parse it (a rule `root` is required)"
                ))
            })?),
        };
        let mut stages = Vec::new();
        if s.repeat_penalty != 1.0 {
            stages.push(LlamaSampler::penalties(
                model.n_vocab(),
                s.repeat_last_n.max(0),
                s.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if s.temperature > 0.0 {
            if s.top_k > 0 {
                stages.push(LlamaSampler::top_k(s.top_k));
            }
            if s.top_p < 1.0 {
                stages.push(LlamaSampler::top_p(s.top_p, 1));
            }
            stages.push(LlamaSampler::temp(s.temperature));
            stages.push(LlamaSampler::dist(s.seed));
        } else if !stages.is_empty() {
            stages.push(LlamaSampler::greedy());
        }
        let chain = (!stages.is_empty()).then(|| LlamaSampler::chain_simple(stages));
        Ok(TokenSampler { grammar, chain })
    }

    /// Chooses the next token from `logits` and records it in the samplers' state.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> LlamaToken {
        let token = match self.pick(logits, false) {
            Some(t) if self.grammar_accepts(t, logits) => t,
            // The unconstrained choice breaks the grammar: constrain the whole vocabulary.
            _ => self
                .pick(logits, true)
                .unwrap_or_else(|| LlamaToken::new(argmax(logits) as i32)),
        };
        if let Some(g) = &mut self.grammar {
            g.accept(token);
        }
        if let Some(c) = &mut self.chain {
            c.accept(token);
        }
        token
    }

    fn pick(&mut self, logits: &[f32], constrained: bool) -> Option<LlamaToken> {
        if !constrained && self.chain.is_none() {
            return Some(LlamaToken::new(argmax(logits) as i32));
        }
        let mut data = LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken::new(i as i32), l, 0.0)),
            false,
        );
        if constrained {
            if let Some(g) = &mut self.grammar {
                data.apply_sampler(g);
            }
        }
        match &mut self.chain {
            Some(c) => {
                data.apply_sampler(c);
                data.selected_token()
            }
            None => data
                .data
                .iter()
                .filter(|d| d.logit() > f32::NEG_INFINITY)
                .max_by(|a, b| a.logit().total_cmp(&b.logit()))
                .map(|d| d.id()),
        }
    }

    fn grammar_accepts(&mut self, token: LlamaToken, logits: &[f32]) -> bool {
        let Some(g) = &mut self.grammar else {
            return true;
        };
        let logit = logits[token.0 as usize];
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, logit, 0.0)], false);
        one.apply_sampler(g);
        one.data[0].logit() > f32::NEG_INFINITY
    }
}

/// Index of the largest value (the first one on ties).
pub(crate) fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[token]` for several tokens, computing the normaliser once.
/// The `k` most likely tokens of a row of logits with their log-probabilities, best first.
pub(crate) fn top_log_probs(logits: &[f32], k: usize) -> Vec<(i32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(k);
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .map(|i| (i as i32, (logits[i] as f64 - log_z) as f32))
        .collect()
}

pub(crate) fn log_probs(logits: &[f32], tokens: &[i32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    tokens
        .iter()
        .map(|&t| (logits[t as usize] as f64 - log_z) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_and_log_probs() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        assert_eq!(argmax(&logits), 1);
        let lp = log_probs(&logits, &[0, 1, 2, 3]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[1] - lp[3]).abs() < 1e-7 && lp[1] > lp[2] && lp[2] > lp[0]);
        let top = top_log_probs(&logits, 3);
        assert_eq!(top.len(), 3);
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
        assert_eq!(top[2].0, 2);
        assert!((top[0].1 - lp[1]).abs() < 1e-6);
    }

    #[test]
    fn bad_sampling_values_are_rejected() {
        for s in [
            Sampling {
                temperature: -1.0,
                ..Sampling::default()
            },
            Sampling {
                top_p: 0.0,
                ..Sampling::default()
            },
            Sampling {
                top_k: -3,
                ..Sampling::default()
            },
            Sampling {
                repeat_penalty: f32::NAN,
                ..Sampling::default()
            },
        ] {
            assert!(
                matches!(s.validate(), Err(Error::InvalidParameter(_))),
                "{s:?}"
            );
        }
        Sampling::seeded(0.8, 7).validate().unwrap();
    }
}
