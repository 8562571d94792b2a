//! The candle transformer against llama.cpp on the shipped SmolLM2 GGUF.

mod common;

use common::{agreement, model_path};

use geek_backend::{Engine, EngineConfig};
use geek_compress::{AdaptedModel, BaseWeights};

#[test]
fn candle_and_llama_cpp_predict_the_same_next_tokens() {
    let path = model_path();
    let base = BaseWeights::load(&path).unwrap();
    assert_eq!(base.config.n_layer, 30);
    let model = AdaptedModel::new(&base, None).unwrap();
    let engine = Engine::load(EngineConfig::new(&path).with_threads(2)).unwrap();
    let prompts = [
        "<|im_start|>user\nCould a llama give birth twice during the Vietnam War?<|im_end|>\n<|im_start|>assistant\n",
        "The capital of France is Paris. The capital of Germany is",
        "Action: AddDecomp\nSub-question 1: How long is the gestation period of a llama?",
    ];
    let (mut kl_sum, mut agree, mut n) = (0.0, 0.0, 0);
    for prompt in prompts {
        let tokens = engine.tokenize(prompt, true).wait().unwrap();
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let (kl, top1) = agreement(&engine, &model, &ids);
        kl_sum += kl * ids.len() as f64;
        agree += top1 * ids.len() as f64;
        n += ids.len();
    }
    let kl = kl_sum / n as f64;
    let top1 = agree / n as f64;
    eprintln!("{n} positions: mean KL(llama.cpp ‖ candle) = {kl:.5}, top-1 agreement {top1:.3}");
    assert!(n > 40);
    assert!(kl < 0.02, "mean KL {kl}");
    assert!(top1 >= 0.95, "top-1 agreement {top1}");
}
