//! The importance of each linear layer's input columns: the mean squared activation entering
//! the layer on calibration text, what llama.cpp's `imatrix` tool measures.
//!
//! A weight's rounding error reaches the layer's output multiplied by its input: an error on
//! a column whose input is large costs more than the same error on a quiet one. Weighing each
//! weight's squared error by its column's mean squared input is what makes 2- and 3-bit
//! quantizers keep the columns that matter ([`crate::blocks::ScaleInit::Imatrix`]).
//!
//! ```no_run
//! use geek_compress::importance::Importance;
//! use geek_compress::{AdaptedModel, BaseWeights, Target};
//!
//! # fn main() -> geek_compress::Result<()> {
//! let base = BaseWeights::load("model.gguf")?;
//! let model = AdaptedModel::new(&base, None)?;
//! let rows = vec![vec![1u32, 2, 3, 4], vec![5, 6, 7, 8]];
//! let importance = Importance::measure(&model, &rows, 2, &mut |_done| {})?;
//! let down = importance.of(0, Target::Down).expect("every linear is measured");
//! assert_eq!(down.len(), base.config.n_ff);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use candle_core::Tensor;

use crate::distill::batch_of;
use crate::{AdaptedModel, Error, Result, Target};

/// Mean squared input of every column of every linear weight, by layer and target.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    means: HashMap<(usize, Target), Vec<f32>>,
    output: Vec<f32>,
    /// Tokens the means are over.
    pub tokens: usize,
}

impl Importance {
    /// Runs `model` over `rows` (token rows of one length, `batch` at a time) and averages the
    /// square of each input column of each linear weight over every token. `on_batch` is
    /// told the rows done after each batch.
    pub fn measure(
        model: &AdaptedModel,
        rows: &[Vec<u32>],
        batch: usize,
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Importance> {
        if rows.is_empty() || batch == 0 {
            return Err(Error::Config(
                "the importance needs calibration rows and a positive batch".into(),
            ));
        }
        let mut sums: HashMap<(usize, Target), Vec<f64>> = HashMap::new();
        let mut output = Vec::new();
        let mut tokens = 0;
        let mut done = 0;
        for chunk in rows.chunks(batch) {
            let b = batch_of(chunk)?;
            let hidden = model.observe_inputs(&b, &mut |layer, targets, x| {
                let squares = column_squares(x)?;
                for &target in targets {
                    add(sums.entry((layer, target)).or_default(), &squares);
                }
                Ok(())
            })?;
            add(&mut output, &column_squares(&hidden)?);
            tokens += chunk.iter().map(Vec::len).sum::<usize>();
            done += chunk.len();
            on_batch(done);
        }
        let mean = |sum: Vec<f64>| sum.iter().map(|s| (s / tokens as f64) as f32).collect();
        let means = sums
            .into_iter()
            .map(|(key, sum)| (key, mean(sum)))
            .collect();
        Ok(Importance {
            means,
            output: mean(output),
            tokens,
        })
    }

    /// The mean squared input of each column of `layer`'s `target` weight.
    pub fn of(&self, layer: usize, target: Target) -> Option<&[f32]> {
        self.means.get(&(layer, target)).map(Vec::as_slice)
    }

    /// The mean squared input of each column of the output layer (the final hidden states,
    /// after the output norm).
    pub fn output(&self) -> &[f32] {
        &self.output
    }
}

/// Adds `squares` to the running sums `sum` (empty the first time).
fn add(sum: &mut Vec<f64>, squares: &[f32]) {
    sum.resize(squares.len(), 0.0);
    for (s, v) in sum.iter_mut().zip(squares) {
        *s += *v as f64;
    }
}

/// Σ over rows of x² for each column of `x` `[n, in]`.
fn column_squares(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.detach().sqr()?.sum(0)?.to_vec1::<f32>()?)
}
