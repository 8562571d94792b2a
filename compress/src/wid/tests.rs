use super::run::batches;
use super::student::{fold, truncation};
use super::student::{Compactors, Removal};
use super::*;
use crate::init::Rng;
use candle_core::Device;
use candle_core::Tensor;
use geek_retriever::dense::{forward_with, mean_pool_normalized};
use std::collections::{HashMap, HashSet};

/// A small BERT with random weights (2 layers, hidden 8, 2 heads of 4, MLP 16).
fn tiny_bert(seed: u64) -> Bert {
    let config = BertConfig {
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        vocab_size: 20,
        layer_norm_eps: 1e-12,
        attention_head_size: None,
    };
    let mut rng = Rng::new(seed);
    let mut random = |shape: &[usize], centre: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| centre + 0.5 * rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut t = HashMap::new();
    let (d, f, a) = (8, 16, 8);
    t.insert(
        "embeddings.word_embeddings.weight".into(),
        random(&[20, d], 0.0),
    );
    t.insert(
        "embeddings.position_embeddings.weight".into(),
        random(&[16, d], 0.0),
    );
    t.insert(
        "embeddings.token_type_embeddings.weight".into(),
        random(&[2, d], 0.0),
    );
    for name in super::student::norm_names(2) {
        t.insert(format!("{name}.weight"), random(&[d], 1.0));
        t.insert(format!("{name}.bias"), random(&[d], 0.0));
    }
    for i in 0..2 {
        let p = format!("encoder.layer.{i}");
        for (n, out, inp) in [
            ("attention.self.query", a, d),
            ("attention.self.key", a, d),
            ("attention.self.value", a, d),
            ("attention.output.dense", d, a),
            ("intermediate.dense", f, d),
            ("output.dense", d, f),
        ] {
            t.insert(format!("{p}.{n}.weight"), random(&[out, inp], 0.0));
            t.insert(format!("{p}.{n}.bias"), random(&[out], 0.0));
        }
    }
    Bert::from_tensors(config, t).unwrap()
}

fn inputs() -> (Tensor, Tensor) {
    let ids = Tensor::from_vec(vec![1u32, 5, 7, 9, 2, 3, 4, 0], (2, 4), &Device::Cpu).unwrap();
    let mask =
        Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 1., 1., 0.], (2, 4), &Device::Cpu).unwrap();
    (ids, mask)
}

fn embeddings(config: &BertConfig, t: &HashMap<String, Tensor>, w: Option<&Tensor>) -> Tensor {
    let (ids, mask) = inputs();
    let hidden = forward_with(config, t, w, &ids, &mask).unwrap();
    mean_pool_normalized(&hidden, &mask).unwrap()
}

fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn identity_compactors_are_the_teacher() {
    let teacher = tiny_bert(1);
    let c = Compactors::identity(&teacher).unwrap();
    let masks = c.masks(None, 1.0).unwrap();
    let t = c.effective(&teacher, &masks).unwrap();
    let student = embeddings(&teacher.config, &t, Some(Compactors::norm_weights(&masks)));
    let direct = embeddings(&teacher.config, teacher.tensors(), None);
    assert!(max_gap(&student, &direct) < 1e-5);
}

#[test]
fn trained_compactors_fold_into_a_smaller_bert_that_computes_the_same() {
    let teacher = tiny_bert(2);
    let c = Compactors::identity(&teacher).unwrap();
    // Compactors away from the identity, as training leaves them.
    let mut rng = Rng::new(3);
    for (_, var) in c.named() {
        let shape = var.as_tensor().dims().to_vec();
        let n: usize = shape.iter().product();
        let noise: Vec<f32> = (0..n).map(|_| 0.3 * rng.normal()).collect();
        let noise = Tensor::from_vec(noise, shape, &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    let removal = Removal {
        hidden: vec![1, 4, 6],
        qk: vec![vec![0, 6], vec![3, 5]],
        vo: vec![vec![2, 4], vec![1, 7]],
        ffn: vec![vec![0, 3, 8, 15], vec![1, 2, 3, 4]],
    };
    let masks = c.masks(Some(&removal), 0.0).unwrap();
    let t = c.effective(&teacher, &masks).unwrap();
    let before = embeddings(&teacher.config, &t, Some(Compactors::norm_weights(&masks)));
    let folded = fold(&teacher, &c, &removal).unwrap();
    assert_eq!(folded.config.hidden_size, 5);
    assert_eq!(folded.config.head_size(), 3);
    assert_eq!(folded.config.intermediate_size, 12);
    let after = embeddings(&folded.config, folded.tensors(), None);
    assert_eq!(after.dims(), &[2, 5]);
    let kept = Tensor::from_vec(vec![0u32, 2, 3, 5, 7], 5, &Device::Cpu).unwrap();
    let gap = max_gap(&before.index_select(&kept, 1).unwrap(), &after);
    assert!(gap < 1e-5, "folding changed the embeddings by {gap}");
    // Removed dimensions carry exact zeros before folding.
    let gone = Tensor::from_vec(vec![1u32, 4, 6], 3, &Device::Cpu).unwrap();
    let zeros = before.index_select(&gone, 1).unwrap();
    assert_eq!(
        zeros
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // Half-way through the fade the student is neither.
    let half = c.masks(Some(&removal), 0.5).unwrap();
    let t = c.effective(&teacher, &half).unwrap();
    let mid = embeddings(&teacher.config, &t, Some(Compactors::norm_weights(&half)));
    assert!(max_gap(&mid, &before) > 1e-3);
}

#[test]
fn selection_removes_the_weakest_columns_evenly_per_head() {
    let teacher = tiny_bert(4);
    let c = Compactors::identity(&teacher).unwrap();
    // Importance as training would leave it: hidden column 3 the least useful.
    for (name, score) in c.importance() {
        let n = score.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|j| {
                if name == "importance.hidden" && j == 3 {
                    0.1
                } else {
                    1.0 + j as f32
                }
            })
            .collect();
        score
            .set(&Tensor::from_vec(v, score.as_tensor().dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let widths = Widths {
        hidden: 7,
        heads: 2,
        head: 2,
        ffn: 10,
    };
    let r = c.select(&widths).unwrap();
    assert_eq!(r.hidden, vec![3]);
    for layer in r.qk.iter().chain(&r.vo) {
        assert_eq!(layer.iter().filter(|&&j| j < 4).count(), 2);
        assert_eq!(layer.iter().filter(|&&j| j >= 4).count(), 2);
    }
    assert!(r.ffn.iter().all(|l| l == &vec![0, 1, 2, 3, 4, 5]));
    assert_eq!(
        r.qk[0],
        vec![0, 1, 4, 5],
        "the least important of each head"
    );
    assert!(c.penalty().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn importance_sums_first_order_removal_costs() {
    let teacher = tiny_bert(6);
    let c = Compactors::identity(&teacher).unwrap();
    let mut grads = HashMap::new();
    let mut g = vec![0f32; 64];
    g[2 * 8 + 2] = -0.5; // d loss / d H[2][2]: removing column 2 (H[2][2] → 0) costs 0.5
    g[8 + 5] = 3.0; // off the diagonal: H[1][5] is 0, no first-order cost
    grads.insert(
        "hidden".to_string(),
        Tensor::from_vec(g, (8, 8), &Device::Cpu).unwrap(),
    );
    c.accumulate(&grads).unwrap();
    c.accumulate(&grads).unwrap();
    let hidden: Vec<f32> = c.importance()[0].1.as_tensor().to_vec1().unwrap();
    assert_eq!(hidden, vec![0., 0., 1.0, 0., 0., 0., 0., 0.]);
}

#[test]
fn batches_are_full_and_never_repeat_a_passage_or_query() {
    let pairs: Vec<TextPair> = (0..40)
        .map(|i| TextPair {
            query: format!("q{}", i / 2),
            passage_id: format!("p{}", i % 7),
            passage: String::new(),
        })
        .collect();
    let list = batches(&pairs, 4, 9);
    assert!(!list.is_empty());
    for b in &list {
        assert_eq!(b.len(), 4);
        let p: HashSet<_> = b.iter().map(|&i| &pairs[i].passage_id).collect();
        let q: HashSet<_> = b.iter().map(|&i| &pairs[i].query).collect();
        assert_eq!((p.len(), q.len()), (4, 4));
    }
    assert_eq!(list, batches(&pairs, 4, 9), "the order is the seed's");
}

#[test]
fn the_truncated_start_keeps_the_first_dimensions() {
    let teacher = tiny_bert(5);
    let widths = Widths {
        hidden: 6,
        heads: 2,
        head: 3,
        ffn: 8,
    };
    let r = truncation(&teacher.config, &widths);
    assert_eq!(r.hidden, vec![6, 7]);
    assert_eq!(r.qk[0], vec![3, 7]);
    assert_eq!(r.ffn[1], (8..16).collect::<Vec<_>>());
    let student = fold(&teacher, &Compactors::identity(&teacher).unwrap(), &r).unwrap();
    assert!(layer_parameters(&student.config) < layer_parameters(&teacher.config));
    let word = student.tensors()["embeddings.word_embeddings.weight"].clone();
    let full = teacher.tensors()["embeddings.word_embeddings.weight"]
        .narrow(1, 0, 6)
        .unwrap();
    assert_eq!(max_gap(&word, &full), 0.0);
}

#[test]
fn whole_heads_go_first_and_fold_exactly() {
    let teacher = tiny_bert(7);
    let c = Compactors::identity(&teacher).unwrap();
    // Head 1 of every layer matters least.
    for (name, score) in c.importance() {
        let n = score.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|j| match name.as_str() {
                n if n.starts_with("importance.qk") || n.starts_with("importance.vo") => {
                    if j >= 4 {
                        0.1
                    } else {
                        1.0 + j as f32
                    }
                }
                _ => 1.0 + j as f32,
            })
            .collect();
        score
            .set(&Tensor::from_vec(v, score.as_tensor().dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let widths = Widths {
        hidden: 8,
        heads: 1,
        head: 3,
        ffn: 16,
    };
    let r = c.select(&widths).unwrap();
    assert_eq!(
        r.qk[0],
        vec![0, 4, 5, 6, 7],
        "head 1 whole, the weakest of head 0"
    );
    assert_eq!(r.vo[1], vec![0, 4, 5, 6, 7]);
    let masks = c.masks(Some(&r), 0.0).unwrap();
    let t = c.effective(&teacher, &masks).unwrap();
    let before = embeddings(&teacher.config, &t, Some(Compactors::norm_weights(&masks)));
    let folded = fold(&teacher, &c, &r).unwrap();
    assert_eq!(folded.config.num_attention_heads, 1);
    assert_eq!(folded.config.head_size(), 3);
    let after = embeddings(&folded.config, folded.tensors(), None);
    assert!(max_gap(&before, &after) < 1e-5);
    // Query-key and value keeping different heads cannot be one BERT.
    let mut crossed = r.clone();
    crossed.vo[0] = vec![0, 1, 2, 3, 4];
    assert!(fold(&teacher, &c, &crossed).is_err());
}

#[test]
fn soft_labels_cost_nothing_when_the_student_ranks_as_the_teacher() {
    let q = Tensor::from_vec(vec![1f32, 0., 0.6, 0.8], (2, 2), &Device::Cpu).unwrap();
    let p = Tensor::from_vec(vec![0.8f32, 0.6, 0., 1.], (2, 2), &Device::Cpu).unwrap();
    let same = super::run::soft_contrastive(&q, &p, &q, &p, 20.0).unwrap();
    assert!(same.to_scalar::<f32>().unwrap().abs() < 1e-6);
    let swapped = Tensor::from_vec(vec![0f32, 1., 0.8, 0.6], (2, 2), &Device::Cpu).unwrap();
    let other = super::run::soft_contrastive(&q, &p, &q, &swapped, 20.0).unwrap();
    assert!(other.to_scalar::<f32>().unwrap() > 1.0);
}
