//! Weight-inherited distillation of the real all-MiniLM-L6-v2 (`geek model pull
//! all-minilm-l6-v2`): a few steps on StrategyQA paragraphs, folded into a smaller BERT that
//! the retriever loads and that embeds as the student did; the run resumes from its checkpoint;
//! the plain-distillation baseline trains too.

use std::path::PathBuf;

use geek_compress::wid::{
    compress_encoder, save_student, Method, TextPair, WidConfig, WidEvent, Widths,
};
use geek_retriever::dense::Encoder;

fn encoder_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let dir = std::env::var_os("GEEK_ENCODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("GEEK_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/geek/models"))
                .join("encoders/all-minilm-l6-v2")
        });
    assert!(
        dir.join("model.safetensors").is_file(),
        "no encoder at {}: run `geek model pull all-minilm-l6-v2`",
        dir.display()
    );
    dir
}

fn data_dir() -> PathBuf {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    std::env::var_os("GEEK_DATA_DIR").map_or(default, PathBuf::from)
}

/// 40 (title → paragraph) pairs of distinct StrategyQA paragraphs.
fn pairs() -> Vec<TextPair> {
    let path = data_dir().join("strategyqa/strategyqa_train_paragraphs.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    let mut titles = std::collections::HashSet::new();
    all.into_iter()
        .filter_map(|(id, p)| {
            let title = p["title"].as_str()?.to_string();
            let text = p["content"].as_str()?.to_string();
            titles.insert(title.clone()).then(|| TextPair {
                query: format!("What is {title}?"),
                passage: format!("{title}. {text}"),
                passage_id: id,
            })
        })
        .take(40)
        .collect()
}

fn max_gap(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn config() -> WidConfig {
    let mut c = WidConfig::new(
        Method::Wid,
        Widths {
            hidden: 192,
            heads: 6,
            head: 32,
            ffn: 1024,
        },
    );
    c.steps = 6;
    c.batch = 4;
    c.holdout = 8;
    c.max_tokens = 32;
    c.select_at = 0.34;
    c.removed_by = 0.67;
    c.eval_every = 3;
    c.checkpoint_every = 3;
    c
}

#[test]
fn a_few_wid_steps_fold_into_a_smaller_encoder_that_embeds_the_same() {
    let teacher = Encoder::load(&encoder_dir()).unwrap();
    let pairs = pairs();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint");
    let mut events = Vec::new();
    let (student, summary) = compress_encoder(&teacher, &pairs, &config(), Some(&ckpt), &mut |e| {
        events.push(e.clone())
    })
    .unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e, WidEvent::Selected(r) if r.hidden.len() == 192)));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, WidEvent::Step { .. }))
            .count(),
        6
    );
    let last = events.iter().rev().find_map(|e| match e {
        WidEvent::Step { remaining, .. } => Some(*remaining),
        _ => None,
    });
    assert_eq!(
        last,
        Some(0.0),
        "the removed dimensions are gone at the end"
    );
    assert_eq!(student.config.hidden_size, 192);
    assert_eq!(student.config.intermediate_size, 1024);
    assert_eq!(student.config.head_size(), 32);
    assert_eq!(student.config.num_attention_heads, 6);
    assert!(
        summary.fold_max_error < 1e-4,
        "folding changed the embeddings by {}",
        summary.fold_max_error
    );
    assert!(
        summary.student_parameters * 3
            < summary.teacher_parameters + summary.teacher_parameters / 10
    );

    // Written, loaded by the retriever, the same embeddings as in memory.
    let out = dir.path().join("student");
    save_student(&student, &teacher.dir, &out).unwrap();
    let loaded = Encoder::load(&out).unwrap();
    assert_eq!(loaded.dim(), 192);
    let texts = [
        "Could a llama give birth twice during the Vietnam War?",
        "Paris",
    ];
    let a = loaded.encode(&texts).unwrap();
    let b = Encoder::with_bert(&out, student)
        .unwrap()
        .encode(&texts)
        .unwrap();
    assert_eq!(max_gap(&a, &b), 0.0);

    // A rerun of the finished run resumes at its end: no step is trained again.
    let mut events = Vec::new();
    let (again, _) = compress_encoder(&teacher, &pairs, &config(), Some(&ckpt), &mut |e| {
        events.push(e.clone())
    })
    .unwrap();
    assert!(
        matches!(events[0], WidEvent::Started { start_step: 6, .. }),
        "{:?}",
        events[0]
    );
    assert!(!events.iter().any(|e| matches!(e, WidEvent::Step { .. })));
    let c = loaded.encode(&texts).unwrap();
    let d = Encoder::with_bert(&out, again)
        .unwrap()
        .encode(&texts)
        .unwrap();
    let gap = max_gap(&c, &d);
    assert!(
        gap < 1e-6,
        "the resumed run folds to the same student ({gap})"
    );

    // Other settings on the same checkpoint are refused.
    let mut other = config();
    other.lr *= 2.0;
    let err = compress_encoder(&teacher, &pairs, &other, Some(&ckpt), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn the_plain_distillation_baseline_trains_a_truncated_student() {
    let teacher = Encoder::load(&encoder_dir()).unwrap();
    let mut config = config();
    config.method = Method::Kd;
    config.steps = 3;
    let (student, summary) =
        compress_encoder(&teacher, &pairs(), &config, None, &mut |_| {}).unwrap();
    assert_eq!(student.config.hidden_size, 192);
    assert_eq!(summary.fold_max_error, 0.0);
    assert!(summary.student_heldout.loss.is_finite());
}
