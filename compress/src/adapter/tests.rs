use super::*;

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Each paper's update written out factor by factor, without folding: the reference the
/// folded [`LinearDelta::lora_factors`] (what training and export use) must equal.
fn reference_update(delta: &LinearDelta, x: &Tensor) -> Tensor {
    let t = |v: &Tensor| v.t().unwrap();
    let y = match delta {
        LinearDelta::Lora { a, b, .. } => x.matmul(&t(a)).unwrap().matmul(&t(b)).unwrap(),
        LinearDelta::Moslora { a, m, b, .. } => x
            .matmul(&t(a))
            .unwrap()
            .matmul(&t(m))
            .unwrap()
            .matmul(&t(b))
            .unwrap(),
        LinearDelta::Loretta { a, b, .. } => x
            .matmul(&t(&a.full().unwrap()))
            .unwrap()
            .matmul(&t(&b.full().unwrap()))
            .unwrap(),
    };
    (y * delta.scale()).unwrap()
}

#[test]
fn modes_multiply_back_to_the_dimension() {
    for (n, k) in [
        (576, 3),
        (1536, 3),
        (192, 3),
        (16, 2),
        (49152, 3),
        (7, 3),
        (1, 2),
    ] {
        let m = factor_modes(n, k);
        assert_eq!(m.iter().product::<usize>(), n, "{n}: {m:?}");
        assert!(m.len() <= k.max(1));
    }
    assert_eq!(factor_modes(576, 3), vec![6, 8, 12]);
    assert_eq!(factor_modes(16, 2), vec![4, 4]);
}

#[test]
fn every_linear_kind_starts_at_zero_and_factors_match_its_forward() {
    let x = Rng::new(5).normal_tensor(&[3, 24], 1.0).unwrap();
    for kind in [
        AdapterKind::Lora,
        AdapterKind::Moslora,
        AdapterKind::LorettaRep,
    ] {
        let mut cfg = AdapterConfig::new(kind);
        cfg.rank = 4;
        let delta = LinearDelta::new(&cfg, 24, 12, &mut Rng::new(1)).unwrap();
        assert_eq!(max_abs(&reference_update(&delta, &x)), 0.0, "{kind:?}");
        // Move B away from zero, then the merged ΔW must equal the layer's own forward.
        let mut vars = Vec::new();
        delta.named_vars("t", &mut vars);
        for (name, v) in &vars {
            if name.contains("lora_b") {
                let shape = v.dims().to_vec();
                v.set(&Rng::new(9).normal_tensor(&shape, 0.3).unwrap())
                    .unwrap();
            }
        }
        let direct = reference_update(&delta, &x);
        let merged = x
            .matmul(&delta.delta_weight().unwrap().t().unwrap())
            .unwrap();
        assert!(max_abs(&direct) > 0.0);
        assert!(max_abs(&(direct - merged).unwrap()) < 1e-4, "{kind:?}");
    }
}

#[test]
fn tensor_trains_have_far_fewer_weights_than_the_matrices_they_represent() {
    let tt = TtMatrix::new(16, 576, 5, 0.02, false, &mut Rng::new(0)).unwrap();
    assert_eq!(tt.full().unwrap().dims(), &[16, 576]);
    assert!(
        tt.parameter_count() * 5 < 16 * 576,
        "{}",
        tt.parameter_count()
    );
    let std: f32 = tt
        .full()
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((0.005..0.06).contains(&std), "{std}");
}

#[test]
fn names_parse_back() {
    for k in AdapterKind::ALL {
        assert_eq!(AdapterKind::from_name(k.name()).unwrap(), k);
    }
    assert_eq!(Target::from_name("q_proj").unwrap(), Target::Q);
    assert!(Target::from_name("lm_head").is_err());
}
