//! Quantization on the real model. Round-to-nearest against the shipped file: SmolLM2's Q4_1
//! GGUF was written by llama.cpp's quantizer, so dequantizing it and quantizing back to Q4_1
//! must give the same bytes. Learned scales: trained, written, and served by llama.cpp.

mod common;

use common::{agreement, model_path};

use std::fs::File;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use geek_backend::{Engine, EngineConfig};
use geek_compress::blocks::{BlockFormat, Granularity, QuantGrid, ScaleInit};
use geek_compress::distill::{calibration_rows, learn, LearnEvent, LearnedConfig};
use geek_compress::fused::rms_norm;
use geek_compress::importance::Importance;
use geek_compress::quantize::{quantize_rtn, QuantType};
use geek_compress::{AdaptedModel, BaseWeights, Target};
use sha2::{Digest, Sha256};

#[test]
fn requantizing_the_shipped_q4_1_file_reproduces_llama_cpps_bytes() {
    let _model = common::one_model_at_a_time();
    let shipped = model_path();
    let base = BaseWeights::load(&shipped).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_1.gguf");
    let report = quantize_rtn(&base, QuantType::Q4_1, &out).unwrap();
    assert_eq!(report.tensors_by_type["q4_1"], 210);

    let mut a = File::open(&shipped).unwrap();
    let mut b = File::open(&out).unwrap();
    let (ca, cb) = (
        Content::read(&mut a).unwrap(),
        Content::read(&mut b).unwrap(),
    );
    let mut same = 0;
    for (name, info) in &ca.tensor_infos {
        let ta = ca.tensor(&mut a, name, &Device::Cpu).unwrap();
        let tb = cb.tensor(&mut b, name, &Device::Cpu).unwrap();
        assert_eq!(ta.dtype(), tb.dtype(), "{name}");
        assert_eq!(info.shape, cb.tensor_infos[name].shape, "{name}");
        assert!(ta.data().unwrap() == tb.data().unwrap(), "{name} differs");
        same += 1;
    }
    assert_eq!(same, 272);
}

/// Q8_0 and Q4_0 by round-to-nearest give, tensor by tensor, the bytes llama.cpp's
/// `llama-quantize` wrote from the same f32 weights (hashes recorded in the fixture, since
/// building llama.cpp's tools is not part of the test run).
#[test]
fn rtn_q8_0_and_q4_0_are_byte_identical_to_llama_quantize() {
    let _model = common::one_model_at_a_time();
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/llama_quantize_sha256.json")).unwrap();
    let base = BaseWeights::load(model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for ty in [QuantType::Q8_0, QuantType::Q4_0] {
        let expected = fixture[ty.name()].as_object().unwrap();
        let out = dir.path().join(format!("{}.gguf", ty.name()));
        quantize_rtn(&base, ty, &out).unwrap();
        let mut file = File::open(&out).unwrap();
        let content = Content::read(&mut file).unwrap();
        assert_eq!(content.tensor_infos.len(), expected.len());
        for (name, want) in expected {
            let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let digest = Sha256::digest(t.data().unwrap());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            let type_name = format!("{:?}", t.dtype()).to_lowercase();
            assert_eq!(
                format!("{type_name}:{hex}"),
                want.as_str().unwrap(),
                "{} {name}",
                ty.name()
            );
        }
    }
}

/// The test model's f32 weights and its tokens of the calibration text.
fn base_and_text() -> (BaseWeights, Vec<u32>) {
    let path = model_path();
    let base = BaseWeights::load(&path).unwrap();
    let engine = Engine::load(EngineConfig::new(&path).with_threads(2)).unwrap();
    let tokens = llama_text_tokens(&engine);
    (base, tokens)
}

fn llama_text_tokens(engine: &Engine) -> Vec<u32> {
    let text = "The llama is a domesticated South American camelid, widely used as a meat and \
        pack animal by Andean cultures since the pre-Columbian era. Llamas are social animals \
        and live with others as a herd. Their wool is soft and contains only a small amount of \
        lanolin. Llamas can learn simple tasks after a few repetitions. The gestation period of \
        a llama is about eleven and a half months. The Vietnam War lasted from 1955 to 1975, \
        almost twenty years, during which a llama could give birth many times.";
    common::token_ids(engine, text, false)
}

/// Learned Q4_0 and learned 2-bit (Q2_K with its sub-block scales and minimums on ffn_down,
/// learned Q4_0 where rows are 576 wide): a few distillation steps run, the files hold the promised types,
/// and llama.cpp, reading them, predicts what the candle student predicts.
#[test]
fn learned_scales_train_and_llama_cpp_serves_exactly_them() {
    let _model = common::one_model_at_a_time();
    let (base, tokens) = base_and_text();
    let rows = calibration_rows(&[tokens.clone(), tokens.clone()], 32, 5);
    assert_eq!(rows.len(), 5);
    let dir = tempfile::tempdir().unwrap();
    // llama.cpp rounds activations to 8 bits inside its dot products (per 32 values for
    // Q4_0, per 256 for Q2_K: about 1% and 2% relative error on heavy-tailed inputs, measured
    // with candle's port of those dot products on our blocks), so it is compared with the
    // student relative to how far the student is from the teacher: a mis-encoded block would
    // put llama.cpp nats away. Measured: Q4_0 KL 0.002–0.004 (student–teacher 0.36), top-1
    // 0.90–1.0 over 40 positions; Q2_K (real 4-bit sub-block scales and minimums) KL 0.006
    // (student–teacher 3.5 → 1.5 over the three steps), top-1 0.95.
    let cases = [
        (QuantType::Q4_0, vec![("q4_0", 210), ("q8_0", 1)]),
        (
            QuantType::Q2K,
            vec![("q2_k", 30), ("q4_0", 180), ("q8_0", 1)],
        ),
    ];
    for (ty, written) in cases {
        let config = LearnedConfig {
            ty,
            init: ScaleInit::Rtn,
            steps: 3,
            batch: 2,
            lr: 6e-2,
            warmup: 1,
            memory_bank: 64,
            holdout: 1,
            ..LearnedConfig::default()
        };
        // With a checkpoint every step; the state after step 2 is copied aside, as if the
        // run had been killed during step 3.
        let ckpt = dir.path().join(format!("{}.ckpt", ty.name()));
        let killed = dir.path().join(format!("{}-killed.ckpt", ty.name()));
        let config = LearnedConfig {
            checkpoint_every: 1,
            ..config
        };
        let mut steps = 0;
        let (model, summary) = learn(&base, &rows, &config, Some(&ckpt), &mut |e| {
            if let LearnEvent::Step { kl, step, .. } = e {
                assert!(kl.is_finite());
                steps += 1;
                if *step == 3 {
                    copy_dir(&ckpt, &killed);
                }
            }
        })
        .unwrap();
        assert_eq!(steps, 3);
        eprintln!(
            "{}: held-out KL {:.4} -> {:.4}",
            ty.name(),
            summary.initial_kl,
            summary.final_kl
        );
        assert!(summary.final_kl.is_finite());
        if ty == QuantType::Q2K {
            // Round-to-nearest 2-bit is far off; even three steps pull it back.
            assert_eq!(summary.best_step, 3, "{summary:?}");
            assert!(summary.final_kl < summary.initial_kl, "{summary:?}");
        }

        let out = dir.path().join(format!("learned-{}.gguf", ty.name()));
        let report = model.write_gguf(&base, &out).unwrap();
        // Resuming the "killed" run does step 3 only and ends with the same file.
        let mut resumed_at = None;
        let (again, _) = learn(&base, &rows, &config, Some(&killed), &mut |e| {
            if let LearnEvent::Started { start_step, .. } = e {
                resumed_at = Some(*start_step);
            }
        })
        .unwrap();
        assert_eq!(resumed_at, Some(2));
        let out2 = dir.path().join(format!("resumed-{}.gguf", ty.name()));
        again.write_gguf(&base, &out2).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(),
            "{}: resumed run differs",
            ty.name()
        );
        // Other settings are refused, not silently mixed.
        let other = LearnedConfig {
            temperature: 0.5,
            ..config.clone()
        };
        let refused = learn(&base, &rows, &other, Some(&killed), &mut |_| {});
        assert!(
            matches!(
                refused,
                Err(geek_compress::Error::CheckpointMismatch { .. })
            ),
            "{:?}",
            refused.err()
        );
        for (name, n) in written {
            assert_eq!(report.tensors_by_type[name], n, "{report:?}");
        }
        let served = Engine::load(EngineConfig::new(&out).with_threads(2)).unwrap();
        let (kl, top1) = agreement(&served, &model.student_model(&base).unwrap(), &tokens[..40]);
        eprintln!(
            "{}: llama.cpp vs the candle student: KL {kl:.5}, top-1 {top1:.3}",
            ty.name()
        );
        let bound = 0.02f64.max(0.05 * summary.final_kl);
        assert!(kl < bound, "{}: KL {kl} ≥ {bound}", ty.name());
        if ty == QuantType::Q4_0 {
            assert!(top1 >= 0.85, "top-1 {top1}");
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn qat_trains_the_weights_and_scales_alone_leave_them() {
    // Without --qat the student's weights are the base's own tensors (no copy, no gradient);
    // with it they are variables the optimizer moves, so the written blocks differ.
    let _model = common::one_model_at_a_time();
    let (base, tokens) = base_and_text();
    let rows = calibration_rows(&[tokens.clone(), tokens], 32, 4);
    let dir = tempfile::tempdir().unwrap();
    let run = |train_weights: bool| {
        let config = LearnedConfig {
            ty: QuantType::Q4_0,
            init: ScaleInit::Rtn,
            steps: 2,
            batch: 2,
            warmup: 1,
            holdout: 1,
            memory_bank: 16,
            train_weights,
            weight_lr: 1e-3,
            ..LearnedConfig::default()
        };
        let mut learnable = 0;
        let (model, _) = learn(&base, &rows, &config, None, &mut |e| {
            if let LearnEvent::Started { learnable: n, .. } = e {
                learnable = *n;
            }
        })
        .unwrap();
        let out = dir.path().join(format!("qat-{train_weights}.gguf"));
        model.write_gguf(&base, &out).unwrap();
        (learnable, std::fs::read(out).unwrap())
    };
    let (scales_only, scaled) = run(false);
    let (with_weights, trained) = run(true);
    // SmolLM2's 210 linear matrices hold about 106M weights.
    assert!(
        with_weights - scales_only > 100_000_000,
        "{scales_only} vs {with_weights}"
    );
    assert!(
        scaled != trained,
        "QAT left every block as the scales alone did"
    );
}

/// The imatrix start: the importance is the mean square of what enters each linear weight
/// (checked by hand on layer 0's query input), a start weighted by it leaves less error in
/// the layer's output on those inputs than the unweighted one, and a learned run measures it
/// on its training rows.
#[test]
fn the_imatrix_start_weighs_errors_by_what_the_inputs_carry() {
    let _model = common::one_model_at_a_time();
    let (base, tokens) = base_and_text();
    let rows = calibration_rows(&[tokens.clone(), tokens], 32, 4);
    let teacher = AdaptedModel::new(&base, None).unwrap();
    let mut done = Vec::new();
    let importance = Importance::measure(&teacher, &rows[..3], 2, &mut |n| done.push(n)).unwrap();
    assert_eq!((done, importance.tokens), (vec![2, 3], 96));
    let c = &base.config;
    assert_eq!(importance.output().len(), c.n_embd);
    for layer in 0..c.n_layer {
        for target in Target::ALL {
            let a = importance.of(layer, target).unwrap();
            let name = format!("blk.{layer}.{}.weight", target.gguf());
            assert_eq!(a.len(), base.get(&name).unwrap().dim(1).unwrap(), "{name}");
            assert!(a.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}");
        }
        assert_eq!(
            importance.of(layer, Target::Q),
            importance.of(layer, Target::V)
        );
        assert_eq!(
            importance.of(layer, Target::Gate),
            importance.of(layer, Target::Up)
        );
    }
    // Layer 0's query input is the attention-normed token embedding.
    let ids: Vec<u32> = rows[..3].concat();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let embedded = base
        .get("token_embd.weight")
        .unwrap()
        .index_select(&ids, 0)
        .unwrap();
    let norm = base.get("blk.0.attn_norm.weight").unwrap();
    let x = rms_norm(&embedded, norm, c.rms_eps).unwrap();
    let by_hand: Vec<f32> = x.sqr().unwrap().mean(0).unwrap().to_vec1().unwrap();
    for (a, e) in importance.of(0, Target::Q).unwrap().iter().zip(&by_hand) {
        assert!((a - e).abs() <= 1e-4 * e.max(1e-2), "{a} against {e}");
    }
    // The output error X(W − Ŵ)ᵀ on those inputs, for Q4_0 starts of layer 0's query weight.
    let w = base.get("blk.0.attn_q.weight").unwrap();
    let (n_out, n_in) = w.dims2().unwrap();
    let output_error = |how: ScaleInit| {
        let format = BlockFormat::of(QuantType::Q4_0).unwrap();
        let mut grid = QuantGrid::new(format, Granularity::Block, n_out, n_in).unwrap();
        let (g, b) = grid
            .init_weighted(w, how, importance.of(0, Target::Q))
            .unwrap();
        let wq = grid.fake_quant(w, &g, &b, false).unwrap();
        let e = x.matmul(&(w - wq).unwrap().t().unwrap()).unwrap();
        e.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (mse, imatrix) = (
        output_error(ScaleInit::Mse),
        output_error(ScaleInit::Imatrix),
    );
    // Measured: 25.2 against 84.2 (layer 0's inputs have a few loud columns).
    assert!(imatrix < 0.5 * mse, "imatrix {imatrix} against mse {mse}");

    let config = LearnedConfig {
        ty: QuantType::Q4_0,
        init: ScaleInit::Imatrix,
        steps: 0,
        batch: 2,
        holdout: 1,
        ..LearnedConfig::default()
    };
    let mut measured = Vec::new();
    let (_, summary) = learn(&base, &rows, &config, None, &mut |e| {
        if let LearnEvent::Measuring { rows } = e {
            measured.push(*rows);
        }
    })
    .unwrap();
    assert_eq!(
        measured,
        vec![2, 3],
        "the training rows, not the held-out one"
    );
    assert!(summary.initial_kl.is_finite() && summary.initial_kl > 0.0);
}
