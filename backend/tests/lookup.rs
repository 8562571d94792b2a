//! Prompt-lookup drafting on the real model: outputs are token for token those of plain
//! greedy decoding (with and without a grammar, one sequence and several at once), and drafts
//! are accepted when the output copies the prompt.

mod common;

use common::model_path;
use geek_backend::{Engine, EngineConfig, GenerateParams};

const PASSAGE: &str = "Passage: The gestation period of a llama is 11.5 months (350 days). \
Llamas are social animals and live with others as a herd. Their wool is soft and contains \
only a small amount of lanolin.\nQuote the passage word for word:\n";

fn engine(lookup_draft: usize) -> Engine {
    let mut config = EngineConfig::new(model_path()).with_threads(2);
    config.lookup_draft = lookup_draft;
    Engine::load(config).expect("the test model loads")
}

/// Generations of `params` after `PASSAGE` on `parallel` sequences at once.
fn generate(
    engine: &Engine,
    params: &GenerateParams,
    parallel: usize,
) -> Vec<geek_backend::Completion> {
    let seqs: Vec<_> = (0..parallel).map(|_| engine.sequence().unwrap()).collect();
    for s in &seqs {
        s.append(PASSAGE).wait().unwrap();
    }
    let running: Vec<_> = seqs.iter().map(|s| s.generate(params.clone())).collect();
    running.into_iter().map(|g| g.wait().unwrap()).collect()
}

#[test]
fn drafted_greedy_decoding_equals_plain_greedy_decoding() {
    let _model = common::one_model_at_a_time();
    let plain = engine(0);
    let drafting = engine(4);
    let free = GenerateParams::greedy(48);
    let line = GenerateParams::greedy(48)
        .with_grammar("root ::= [^\\n]+ \"\\n\"")
        .stop_at("\n");
    for params in [free, line] {
        for parallel in [1, 2] {
            let a = generate(&plain, &params, parallel);
            let b = generate(&drafting, &params, parallel);
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.tokens, y.tokens, "{params:?}");
                assert_eq!(x.text, y.text);
                assert_eq!(x.stop, y.stop);
                assert_eq!(x.drafted, 0);
            }
            let drafted: usize = b.iter().map(|c| c.drafted).sum();
            let accepted: usize = b.iter().map(|c| c.accepted).sum();
            assert!(
                accepted > 0 && accepted <= drafted,
                "{drafted} drafted, {accepted} kept"
            );
        }
    }
    let stats = drafting.stats().wait().unwrap();
    assert!(stats.accepted_draft_tokens > 0);
    // Sampled (non-greedy) generation never drafts.
    let sampled = GenerateParams::greedy(16).with_sampling(geek_backend::Sampling::seeded(0.8, 1));
    assert_eq!(generate(&drafting, &sampled, 1)[0].drafted, 0);
}
