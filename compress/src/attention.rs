//! Masked softmax attention as one candle op whose backward pass recomputes the attention
//! probabilities instead of keeping them: a `[b, h, t, t]` matrix per layer would dominate
//! training memory at the trajectory lengths the agent needs (≈1,300 tokens).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use crate::fused::tensor_of;
use crate::Result;

/// softmax(Q·Kᵀ·scale + mask)·V for `q`, `k`, `v` of shape `[b, h, t, d]` and an additive
/// `mask` broadcastable to `[b, h, t, t]`. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let op = Attention {
        mask: mask.clone(),
        scale,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    mask: Tensor,
    scale: f64,
}

impl Attention {
    fn probs(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.mask)?;
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "recomputing-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (tensor_of(s1, l1)?, tensor_of(s2, l2)?, tensor_of(s3, l3)?);
        let out = self.probs(&q, &k)?.matmul(&v)?;
        let shape = out.shape().clone();
        Ok((CpuStorage::F32(out.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let p = self.probs(&q, &k)?;
        let dv = p.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{max_abs_diff as diff, Rng};
    use candle_core::Var;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, s: f64) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * s)
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn forward_and_gradients_match_plain_ops() {
        let mut rng = Rng::new(3);
        let shape = [2, 3, 5, 4];
        let q = Var::from_tensor(&rng.normal_tensor(&shape, 1.0).unwrap()).unwrap();
        let k = Var::from_tensor(&rng.normal_tensor(&shape, 1.0).unwrap()).unwrap();
        let v = Var::from_tensor(&rng.normal_tensor(&shape, 1.0).unwrap()).unwrap();
        let batch =
            crate::model::Batch::packed(&[vec![0; 5], vec![0; 5]], &[vec![5], vec![2, 3]]).unwrap();
        let w = rng.normal_tensor(&shape, 1.0).unwrap();
        let loss = |out: Tensor| (out * &w).unwrap().sum_all().unwrap();
        let ours = attention(&q, &k, &v, &batch.mask, 0.5).unwrap();
        let theirs = reference(&q, &k, &v, &batch.mask, 0.5);
        assert!(diff(&ours, &theirs) < 1e-5);
        let g1 = loss(ours).backward().unwrap();
        let g2 = loss(theirs).backward().unwrap();
        for var in [&q, &k, &v] {
            let (a, b) = (g1.get(var).unwrap(), g2.get(var).unwrap());
            assert!(diff(a, b) < 1e-4, "{}", diff(a, b));
        }
    }
}
