//! Seeded random initialisation (candle's CPU generator cannot be seeded), so that a run and
//! its resumption start from the same adapter weights.

use candle_core::{Device, Tensor};

use crate::Result;

/// A small seeded generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [-bound, bound).
    pub fn uniform(&mut self, bound: f64) -> f32 {
        ((self.unit() * 2.0 - 1.0) * bound) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// PyTorch's `kaiming_uniform_(a = √5)` as PEFT initialises LoRA's A: U(±1/√fan_in).
    pub fn kaiming_uniform(&mut self, rows: usize, fan_in: usize) -> Result<Tensor> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let v: Vec<f32> = (0..rows * fan_in).map(|_| self.uniform(bound)).collect();
        Ok(Tensor::from_vec(v, (rows, fan_in), &Device::Cpu)?)
    }

    /// Normal entries with standard deviation `std`.
    pub fn normal_tensor(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() * std as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// A random n×n orthogonal matrix (Gram–Schmidt on a Gaussian matrix).
    pub fn orthogonal(&mut self, n: usize) -> Result<Tensor> {
        let mut rows: Vec<Vec<f64>> = Vec::with_capacity(n);
        while rows.len() < n {
            let mut v: Vec<f64> = (0..n).map(|_| self.normal() as f64).collect();
            for r in &rows {
                let dot: f64 = v.iter().zip(r).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(r).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-6 {
                rows.push(v.into_iter().map(|a| a / norm).collect());
            }
        }
        let flat: Vec<f32> = rows.into_iter().flatten().map(|a| a as f32).collect();
        Ok(Tensor::from_vec(flat, (n, n), &Device::Cpu)?)
    }
}

/// Largest absolute elementwise difference of two tensors (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_is_orthogonal_and_seeds_repeat() {
        let q = Rng::new(7).orthogonal(6).unwrap();
        let eye = q.matmul(&q.t().unwrap()).unwrap();
        let want = Tensor::eye(6, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&eye, &want) < 1e-5);
        assert_eq!(Rng::new(3).next_u64(), Rng::new(3).next_u64());
        assert_ne!(Rng::new(3).next_u64(), Rng::new(4).next_u64());
        let k = Rng::new(1).kaiming_uniform(4, 100).unwrap();
        let max: f32 = k.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(max <= 0.1 && max > 0.05);
    }
}
