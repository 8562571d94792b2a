use super::*;
use crate::init::{max_abs_diff, Rng};
use candle_core::quantized::GgmlDType;
use candle_core::Var;

fn weights(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| rng.uniform(0.1) * if i % 7 == 0 { 3.0 } else { 1.0 })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn squared_error(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const TYPES: [QuantType; 7] = [
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q5_0,
    QuantType::Q2K,
    QuantType::Q4K,
    QuantType::Q3K,
];

#[test]
fn encoded_blocks_dequantize_to_the_fake_quantized_values() {
    for ty in TYPES {
        for gran in [Granularity::Block, Granularity::Row, Granularity::Module] {
            let f = BlockFormat::of(ty).unwrap();
            let w = weights(3, 512, 7);
            let mut grid = QuantGrid::new(f, gran, 3, 512).unwrap();
            let (gamma, beta) = grid.init(&w, ScaleInit::Mse).unwrap();
            let fake = grid.fake_quant(&w, &gamma, &beta, false).unwrap();
            let q = grid.encode(&w, &gamma, &beta).unwrap();
            let back = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(max_abs_diff(&back, &fake), 0.0, "{ty:?} {gran:?}");
        }
    }
}

#[test]
fn rtn_init_writes_ggmls_round_to_nearest_grid() {
    // Same scales as ggml's reference quantizer; codes may differ only on exact ties.
    for ty in [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
    ] {
        let f = BlockFormat::of(ty).unwrap();
        let w = weights(4, 256, 3);
        let mut grid = QuantGrid::new(f, Granularity::Block, 4, 256).unwrap();
        let (gamma, beta) = grid.init(&w, ScaleInit::Rtn).unwrap();
        let ours = grid
            .encode(&w, &gamma, &beta)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let ggml = QTensor::quantize(&w, ours_dtype(ty))
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ggml = ggml.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let same = ours
            .iter()
            .zip(&ggml)
            .filter(|(a, b)| (*a - *b).abs() < 1e-6)
            .count();
        assert!(
            same as f64 >= 0.99 * ours.len() as f64,
            "{ty:?}: {same}/{}",
            ours.len()
        );
    }
}

fn ours_dtype(ty: QuantType) -> GgmlDType {
    match ty {
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        _ => GgmlDType::Q5_0,
    }
}

#[test]
fn mse_init_never_loses_to_rtn() {
    for ty in TYPES {
        let f = BlockFormat::of(ty).unwrap();
        let w = weights(8, 512, 11);
        let err = |how| {
            let mut grid = QuantGrid::new(f, Granularity::Block, 8, 512).unwrap();
            let (g, b) = grid.init(&w, how).unwrap();
            squared_error(&grid.fake_quant(&w, &g, &b, false).unwrap(), &w)
        };
        let (rtn, mse) = (err(ScaleInit::Rtn), err(ScaleInit::Mse));
        assert!(mse <= rtn, "{ty:?}: mse {mse} > rtn {rtn}");
    }
}

#[test]
fn imatrix_init_picks_the_least_weighted_error_of_the_same_candidates() {
    let (rows, cols) = (4, 512);
    let w = weights(rows, cols, 13);
    let data = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // A few loud input columns among quiet ones, as real activations have.
    let importance: Vec<f32> = (0..cols)
        .map(|j| {
            if j % 37 == 3 {
                50.0
            } else {
                0.1 + (j % 5) as f32 * 0.2
            }
        })
        .collect();
    for ty in TYPES {
        let f = BlockFormat::of(ty).unwrap();
        let mse = block_inits(f, &data, ScaleInit::Mse, None);
        let imatrix = block_inits(f, &data, ScaleInit::Imatrix, Some(&importance));
        assert_eq!(mse.len(), imatrix.len());
        let (mut wins, mut total) = (0, (0f64, 0f64));
        for (b, block) in data.chunks(f.width).enumerate() {
            let col = (b * f.width) % cols;
            let weights = error_weights(block, &importance[col..col + f.width]);
            let error = |(d, m): (f32, f32)| f.block_error(block, d, m, Some(&weights)).0;
            let (e_mse, e_imatrix) = (error(mse[b]), error(imatrix[b]));
            assert!(
                e_imatrix <= e_mse,
                "{ty:?} block {b}: {e_imatrix} > {e_mse}"
            );
            wins += usize::from(e_imatrix < e_mse);
            total.0 += e_mse as f64;
            total.1 += e_imatrix as f64;
        }
        assert!(wins > 0, "{ty:?}: the weighting changed no block");
        assert!(total.1 < total.0, "{ty:?}");
    }
    let mut grid = QuantGrid::new(
        BlockFormat::of(QuantType::Q3K).unwrap(),
        Granularity::Block,
        rows,
        cols,
    )
    .unwrap();
    assert!(
        grid.init(&w, ScaleInit::Imatrix).is_err(),
        "imatrix without an importance"
    );
    assert!(grid
        .init_weighted(&w, ScaleInit::Imatrix, Some(&importance[..256]))
        .is_err());
    let (g, b) = grid
        .init_weighted(&w, ScaleInit::Imatrix, Some(&importance))
        .unwrap();
    assert_eq!(g.dims1().unwrap(), rows * cols / 16);
    assert_eq!(b.dims1().unwrap(), rows * cols / 16);
}

/// On an 8 × 512 test matrix of `seed`: the weights, the least-squares start on `ty`'s grid
/// (fake-quantized), and ggml's own quantization of them into `ggml_ty`, dequantized.
fn start_and_ggmls(ty: QuantType, ggml_ty: GgmlDType, seed: u64) -> (Tensor, Tensor, Tensor) {
    let w = weights(8, 512, seed);
    let mut grid =
        QuantGrid::new(BlockFormat::of(ty).unwrap(), Granularity::Block, 8, 512).unwrap();
    let (g, b) = grid.init(&w, ScaleInit::Mse).unwrap();
    let ours = grid.fake_quant(&w, &g, &b, false).unwrap();
    let ggml = QTensor::quantize(&w, ggml_ty)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    (w, ours, ggml)
}

/// The same straight-through estimator written with candle's own differentiable ops.
fn reference(grid: &QuantGrid, w: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
    let f = grid.format;
    let nb = grid.blocks();
    let wb = w.reshape((nb, f.width)).unwrap();
    let groups: Vec<u32> = (0..nb).map(|b| grid.group_of(b) as u32).collect();
    let groups = Tensor::from_vec(groups, nb, &Device::Cpu).unwrap();
    // mean|w| per group, as a differentiable function of w.
    let per_block = wb.abs().unwrap().sum(1).unwrap();
    let sums = Tensor::zeros(grid.groups(), candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .index_add(&groups, &per_block, 0)
        .unwrap();
    let counts: Vec<f32> = {
        let mut c = vec![0f32; grid.groups()];
        for b in 0..nb {
            c[grid.group_of(b)] += f.width as f32;
        }
        c
    };
    let means = (sums / Tensor::from_vec(counts, grid.groups(), &Device::Cpu).unwrap()).unwrap();
    let mean_b = means.index_select(&groups, 0).unwrap();
    let signs = Tensor::from_vec(grid.signs.clone(), nb, &Device::Cpu).unwrap();
    let d = (((gamma.index_select(&groups, 0).unwrap() * &mean_b).unwrap() * signs).unwrap()
        / f.levels() as f64)
        .unwrap();
    let m = if f.offset {
        (beta * &mean_b).unwrap()
    } else {
        Tensor::zeros(nb, candle_core::DType::F32, &Device::Cpu).unwrap()
    };
    let f16_round = |t: &Tensor| -> Tensor {
        let r = t
            .to_dtype(candle_core::DType::F16)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        (t + (r - t).unwrap().detach()).unwrap()
    };
    let (d, m) = (
        f16_round(&d).unsqueeze(1).unwrap(),
        f16_round(&m).unsqueeze(1).unwrap(),
    );
    let v = wb.broadcast_sub(&m).unwrap().broadcast_div(&d).unwrap();
    let c = v.clamp(f.qmin as f32, f.qmax as f32).unwrap();
    let q = (&c + (c.round().unwrap() - &c).unwrap().detach()).unwrap();
    q.broadcast_mul(&d)
        .unwrap()
        .broadcast_add(&m)
        .unwrap()
        .reshape(w.shape())
        .unwrap()
}

#[test]
fn gradients_match_the_straight_through_estimator_in_plain_ops() {
    for ty in [QuantType::Q4_0, QuantType::Q4_1] {
        for gran in [Granularity::Block, Granularity::Row, Granularity::Module] {
            let f = BlockFormat::of(ty).unwrap();
            let w0 = weights(4, 64, 5);
            let mut grid = QuantGrid::new(f, gran, 4, 64).unwrap();
            let (g0, b0) = grid.init(&w0, ScaleInit::Rtn).unwrap();
            // Shrink the scales so some weights clip.
            let g0 = (g0 * 0.8).unwrap();
            let (w, gamma, beta) = (
                Var::from_tensor(&w0).unwrap(),
                Var::from_tensor(&g0).unwrap(),
                Var::from_tensor(&b0).unwrap(),
            );
            let upstream = weights(4, 64, 9);
            let ours = grid.fake_quant(&w, &gamma, &beta, true).unwrap();
            let plain = reference(&grid, &w, &gamma, &beta);
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = max_abs_diff(a, b);
                let s = max_abs_diff(b, &b.zeros_like().unwrap());
                assert!(
                    d <= 1e-4 * s.max(1.0),
                    "{ty:?} {gran:?} {what}: {d} (scale {s})"
                );
            };
            close(&ours, &plain, "values");
            let ga = (ours * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (plain * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(ga.get(&w).unwrap(), gb.get(&w).unwrap(), "dw");
            close(ga.get(&gamma).unwrap(), gb.get(&gamma).unwrap(), "dgamma");
            if f.offset {
                close(ga.get(&beta).unwrap(), gb.get(&beta).unwrap(), "dbeta");
            }
        }
    }
}

#[test]
fn q3_k_and_q2_k_grids_start_about_as_close_as_ggmls_own() {
    // Real sub-block scales (Q3_K: 16 signed 6-bit ones per super-block; Q2_K: 16 4-bit scales
    // and minimums): the MSE start against ggml's quantizers, which fit each block by
    // weighted least squares.
    for (ty, ggml_ty) in [
        (QuantType::Q3K, GgmlDType::Q3K),
        (QuantType::Q2K, GgmlDType::Q2K),
    ] {
        let (w, ours, ggml) = start_and_ggmls(ty, ggml_ty, 17);
        let (ours, ggml) = (squared_error(&ours, &w), squared_error(&ggml, &w));
        assert!(ours < 1.25 * ggml, "{ty:?}: ours {ours} vs ggml {ggml}");
    }
}

#[test]
fn q4_k_grid_starts_about_as_close_as_ggmls_q4_k() {
    // Real sub-block scales and minimums: the MSE start is within a few percent of ggml's own
    // Q4_K quantizer (which searches each block's range more finely).
    let (w, ours, ggml) = start_and_ggmls(QuantType::Q4K, GgmlDType::Q4K, 13);
    let sq = |t: Tensor| squared_error(&t, &w);
    let (ours, ggml) = (sq(ours), sq(ggml));
    let q4_1 = {
        let f = BlockFormat::of(QuantType::Q4_1).unwrap();
        let mut grid = QuantGrid::new(f, Granularity::Block, 8, 512).unwrap();
        let (g, b) = grid.init(&w, ScaleInit::Mse).unwrap();
        sq(grid.fake_quant(&w, &g, &b, false).unwrap())
    };
    assert!(
        ours < 1.25 * ggml,
        "ours {ours} vs ggml {ggml} (q4_1 {q4_1})"
    );
    // Rows of 512 split into super-blocks of 256; 480 do not.
    let f = BlockFormat::of(QuantType::Q4K).unwrap();
    assert!(QuantGrid::new(f, Granularity::Block, 1, 480).is_err());
}

#[test]
fn the_ggml_start_writes_ggmls_own_k_quant_bytes() {
    for (ty, ggml_ty) in [
        (QuantType::Q3K, GgmlDType::Q3K),
        (QuantType::Q2K, GgmlDType::Q2K),
        (QuantType::Q4K, GgmlDType::Q4K),
    ] {
        for seed in [3, 17] {
            let w = weights(4, 512, seed);
            let f = BlockFormat::of(ty).unwrap();
            let mut grid = QuantGrid::new(f, Granularity::Block, 4, 512).unwrap();
            let (g, b) = grid.init(&w, ScaleInit::Ggml).unwrap();
            let ours = grid.encode(&w, &g, &b).unwrap();
            let ggml = QTensor::quantize(&w, ggml_ty).unwrap();
            let (ours, ggml) = (ours.data().unwrap(), ggml.data().unwrap());
            let same = ours.iter().zip(ggml.iter()).filter(|(a, b)| a == b).count();
            assert_eq!(ours.len(), ggml.len());
            assert!(
                same == ggml.len(),
                "{ty:?} seed {seed}: {} of {} bytes differ",
                ggml.len() - same,
                ggml.len()
            );
        }
    }
}
