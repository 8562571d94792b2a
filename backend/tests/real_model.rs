//! The backend against the real llama.cpp and the real default model (SmolLM2-135M Q4_1).

mod common;

use common::{engine, engine_with, model_path};
use geek_backend::{
    ChatMessage, Engine, EngineConfig, Error, GenEvent, GenerateParams, Sampling, StopReason,
};

const PROMPT: &str = "Question: Could a llama give birth twice during the Vietnam War?\nAnswer:";

#[test]
fn greedy_generation_is_deterministic() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let run = || {
        let seq = engine.sequence().unwrap();
        seq.append(PROMPT).wait().unwrap();
        seq.generate(GenerateParams::greedy(24)).wait().unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    assert!(!a.tokens.is_empty());
    // A second engine on the same file agrees too.
    let other = engine_with(1024);
    let seq = other.sequence().unwrap();
    seq.append(PROMPT).wait().unwrap();
    assert_eq!(
        seq.generate(GenerateParams::greedy(24))
            .wait()
            .unwrap()
            .tokens,
        a.tokens
    );
}

#[test]
fn appending_reuses_the_cache_and_matches_a_fresh_decode() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let kept = engine.sequence().unwrap();
    let first = kept
        .append("The llama is a domesticated South American camelid,")
        .wait()
        .unwrap();
    assert_eq!(first.reused, 0);
    assert_eq!(first.decoded, first.total);
    let second = kept
        .append(" widely used as a meat and pack animal by Andean cultures.")
        .wait()
        .unwrap();
    // Only the new tokens were decoded.
    assert_eq!(second.reused, first.total);
    assert_eq!(second.decoded, second.total - first.total);
    let incremental = kept.logits().wait().unwrap();

    let fresh = engine.sequence().unwrap();
    let all_tokens = kept.tokens().wait().unwrap();
    let stats = fresh.append_tokens(all_tokens).wait().unwrap();
    assert_eq!(stats.decoded, second.total);
    let scratch = fresh.logits().wait().unwrap();

    assert_eq!(incremental.len(), engine.info().n_vocab as usize);
    let max_diff = incremental
        .iter()
        .zip(&scratch)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-3, "logits differ by {max_diff}");
}

#[test]
fn a_forked_sequence_continues_like_its_parent() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let parent = engine.sequence().unwrap();
    parent.append(PROMPT).wait().unwrap();
    let before = engine.stats().wait().unwrap();
    let child = parent.fork().wait().unwrap();
    assert_ne!(child.id(), parent.id());
    assert_eq!(
        engine.stats().wait().unwrap().decode_calls,
        before.decode_calls,
        "fork decoded something"
    );
    let a = child.generate(GenerateParams::greedy(20)).wait().unwrap();
    assert_eq!(a.prefill.decoded, 0, "the child re-decoded its prompt");
    let b = parent.generate(GenerateParams::greedy(20)).wait().unwrap();
    assert_eq!(a.tokens, b.tokens);
    // Branches diverge independently after the fork.
    child.append(" No.").wait().unwrap();
    assert_ne!(
        child.tokens().wait().unwrap(),
        parent.tokens().wait().unwrap()
    );
}

#[test]
fn parallel_sequences_are_batched_and_agree_with_sequential_runs() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let prompts = [
        "The tallest mountain on Earth is",
        "Water boils at a temperature of",
        "The Vietnam War ended in the year",
        "A llama's gestation period lasts",
    ];
    let sequential: Vec<_> = prompts
        .iter()
        .map(|p| {
            let s = engine.sequence().unwrap();
            s.append(*p).wait().unwrap();
            s.generate(GenerateParams::greedy(16))
                .wait()
                .unwrap()
                .tokens
        })
        .collect();
    let seqs: Vec<_> = prompts
        .iter()
        .map(|p| {
            let s = engine.sequence().unwrap();
            s.append(*p).wait().unwrap();
            s
        })
        .collect();
    let before = engine.stats().wait().unwrap();
    let running: Vec<_> = seqs
        .iter()
        .map(|s| s.generate(GenerateParams::greedy(16)))
        .collect();
    let parallel: Vec<_> = running
        .into_iter()
        .map(|g| g.wait().unwrap().tokens)
        .collect();
    let after = engine.stats().wait().unwrap();
    assert_eq!(parallel, sequential);
    let generated = after.generated_tokens - before.generated_tokens;
    let calls = after.decode_calls - before.decode_calls;
    assert!(
        calls < generated / 2,
        "{calls} decode calls for {generated} tokens: not batched"
    );
}

#[test]
fn grammar_constrained_output_always_parses() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let grammar = r#"root ::= "Action: " action "\nCount: " [1-9] [0-9]? "\n"
action ::= "Retrieve" | "SelfAnswer" | "Final""#;
    let pattern = |s: &str| {
        let Some(rest) = s.strip_prefix("Action: ") else {
            return false;
        };
        let Some((action, rest)) = rest.split_once("\nCount: ") else {
            return false;
        };
        let Some(num) = rest.strip_suffix('\n') else {
            return false;
        };
        ["Retrieve", "SelfAnswer", "Final"].contains(&action)
            && (1..=2).contains(&num.len())
            && num.chars().all(|c| c.is_ascii_digit())
            && !num.starts_with('0')
    };
    for seed in 0..6 {
        let seq = engine.sequence().unwrap();
        seq.append("Pick the next step for: what is the capital of Peru?\n")
            .wait()
            .unwrap();
        let params = GenerateParams::greedy(40)
            .with_grammar(grammar)
            .with_sampling(Sampling::seeded(1.5, seed));
        let out = seq.generate(params).wait().unwrap();
        assert!(
            pattern(&out.text),
            "seed {seed}: {:?} does not parse",
            out.text
        );
        assert_eq!(
            out.stop,
            StopReason::Eos,
            "seed {seed}: the grammar ends the output"
        );
    }
}

#[test]
fn a_broken_grammar_is_an_error() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let seq = engine.sequence().unwrap();
    seq.append("Hello").wait().unwrap();
    for bad in ["root ::= (\"unclosed\"", "start ::= \"no root rule\"", ""] {
        let err = seq
            .generate(GenerateParams::greedy(4).with_grammar(bad))
            .wait()
            .unwrap_err();
        assert!(matches!(err, Error::Grammar(_)), "{bad:?}: {err}");
    }
    // The sequence is still usable afterwards.
    seq.generate(GenerateParams::greedy(2)).wait().unwrap();
}

#[test]
fn scoring_ranks_the_right_continuation_and_sums_token_log_probs() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let seq = engine.sequence().unwrap();
    seq.append("The capital of France is").wait().unwrap();
    let s = seq.score(&[" Paris", " Berlin"]).wait().unwrap();
    assert!(s[0] > s[1], "Paris {} vs Berlin {}", s[0], s[1]);
    assert!(s.iter().all(|x| *x < 0.0));

    // A two-token candidate equals log p(first) + log p(second | first).
    let both = seq.score(&[" Paris is"]).wait().unwrap()[0];
    let toks = engine.tokenize(" Paris is", false).wait().unwrap();
    assert_eq!(toks.len(), 2);
    let step = seq.fork().wait().unwrap();
    let lp = |logits: &[f32], t: i32| {
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        logits[t as usize] - max - z.ln()
    };
    let l0 = lp(&step.logits().wait().unwrap(), toks[0]);
    step.append_tokens(vec![toks[0]]).wait().unwrap();
    let l1 = lp(&step.logits().wait().unwrap(), toks[1]);
    assert!((both - (l0 + l1)).abs() < 1e-3, "{both} vs {}", l0 + l1);
    // Scoring did not change the sequence.
    let tokens_after = seq.tokens().wait().unwrap();
    assert_eq!(
        tokens_after,
        engine
            .tokenize("The capital of France is", true)
            .wait()
            .unwrap()
    );
}

#[test]
fn stop_strings_and_streaming() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let seq = engine.sequence().unwrap();
    seq.append("Count: one, two, three, four, five,")
        .wait()
        .unwrap();
    let mut stream = seq.generate(GenerateParams::greedy(40).stop_at(" eight"));
    let mut pieces = String::new();
    let done = loop {
        match stream.next_blocking().expect("stream ends with Done") {
            GenEvent::Piece(p) => pieces.push_str(&p),
            GenEvent::Done(d) => break d,
            GenEvent::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(pieces, done.text);
    assert!(!done.text.contains(" eight"));
    if done.stop == StopReason::Stop(" eight".into()) {
        assert!(done.text.contains("seven"), "{:?}", done.text);
    }
}

#[test]
fn chat_template_comes_from_the_gguf() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    assert!(engine
        .info()
        .chat_template
        .as_deref()
        .unwrap_or("")
        .contains("im_start"));
    let prompt = engine
        .chat_prompt(&[ChatMessage::new("user", "Is a llama a camelid?")], true)
        .wait()
        .unwrap();
    assert!(
        prompt.contains("<|im_start|>user\nIs a llama a camelid?<|im_end|>"),
        "{prompt}"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"));
    // Special tokens in the rendered prompt become single tokens.
    let toks = engine.tokenize(prompt, false).wait().unwrap();
    let im_start = engine.tokenize("<|im_start|>", false).wait().unwrap();
    assert_eq!(im_start.len(), 1);
    assert!(toks.contains(&im_start[0]));
}

#[test]
fn context_overflow_is_reported_before_decoding() {
    let _model = common::one_model_at_a_time();
    let engine = engine_with(256);
    let n_ctx = engine.info().n_ctx as usize;
    let seq = engine.sequence().unwrap();
    let long = "llama ".repeat(n_ctx + 10);
    let err = seq.append(long).wait().unwrap_err();
    match err {
        Error::ContextOverflow { needed, limit } => {
            assert_eq!(limit, n_ctx);
            assert!(needed > n_ctx);
        }
        other => panic!("expected ContextOverflow, got {other}"),
    }
    assert_eq!(engine.stats().wait().unwrap().decode_calls, 0);
    // Nothing was added: a prompt that fits still works.
    seq.append("A short prompt").wait().unwrap();
    let params = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(n_ctx + 10)
    };
    let done = seq.generate(params).wait().unwrap();
    assert_eq!(done.stop, StopReason::ContextFull);
    assert_eq!(seq.tokens().wait().unwrap().len(), n_ctx);
}

#[test]
fn broken_model_files_give_typed_errors() {
    let _model = common::one_model_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model_path()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(
        &garbage,
        b"this is not a model, it is a sentence about llamas",
    )
    .unwrap();

    let load =
        |p: &std::path::Path| Engine::load(EngineConfig::new(p).with_threads(2)).unwrap_err();
    assert!(
        matches!(load(&truncated), Error::CorruptGguf { .. }),
        "{}",
        load(&truncated)
    );
    assert!(matches!(load(&garbage), Error::NotGguf { .. }));
    assert!(matches!(
        load(&dir.path().join("missing.gguf")),
        Error::ModelNotFound(_)
    ));
}

#[test]
fn kv_reuse_counters_prove_incremental_decoding() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let seq = engine.sequence().unwrap();
    let mut unique = seq.append(PROMPT).wait().unwrap().total;
    for step in [
        "\nSub-question 1: How long is a llama's pregnancy?",
        "\nFact: about 11.5 months.",
    ] {
        let p = seq.append(step).wait().unwrap();
        unique = p.total;
        let out = seq
            .generate(GenerateParams::greedy(8).stop_at("\n"))
            .wait()
            .unwrap();
        unique += out.tokens.len();
    }
    let stats = engine.stats().wait().unwrap();
    // Everything decoded once: prompt tokens decoded never exceed the unique tokens.
    assert!(
        stats.prompt_tokens_decoded as usize <= unique,
        "{stats:?} unique={unique}"
    );
    assert!(
        stats.prompt_tokens_requested > stats.prompt_tokens_decoded * 2,
        "{stats:?}"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let run = |seed: u32| {
        let seq = engine.sequence().unwrap();
        seq.append("Once upon a time, a llama").wait().unwrap();
        let sampling = Sampling {
            temperature: 1.2,
            top_k: 50,
            top_p: 0.9,
            repeat_penalty: 1.1,
            seed,
            ..Sampling::default()
        };
        seq.generate(GenerateParams::greedy(24).with_sampling(sampling))
            .wait()
            .unwrap()
            .tokens
    };
    assert_eq!(run(42), run(42));
    let distinct: std::collections::HashSet<_> = (0..4).map(run).collect();
    assert!(distinct.len() > 1, "four seeds gave one output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handle_works_from_async_code() {
    let engine = tokio::task::spawn_blocking(engine).await.unwrap();
    let tasks: Vec<_> = ["The sun is a", "Llamas live in"]
        .into_iter()
        .map(|prompt| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let seq = engine.sequence()?;
                seq.append(prompt).await?;
                let mut stream = seq.generate(GenerateParams::greedy(8));
                let mut text = String::new();
                while let Some(ev) = stream.next().await {
                    match ev {
                        GenEvent::Piece(p) => text.push_str(&p),
                        GenEvent::Done(done) => {
                            assert_eq!(done.text, text);
                            return Ok::<_, Error>(done.tokens.len());
                        }
                        GenEvent::Failed(e) => return Err(e),
                    }
                }
                Err(Error::EngineStopped)
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap() > 0);
    }
}

#[test]
fn one_token_steps_agree_with_a_batched_prompt() {
    let _model = common::one_model_at_a_time();
    let engine = engine();
    let text = "The capital of France is Paris, and the capital of Spain is";
    let whole = engine.sequence().unwrap();
    whole.append(text).wait().unwrap();
    let step = engine.sequence().unwrap();
    for t in engine.tokenize(text, true).wait().unwrap() {
        step.append_tokens(vec![t]).wait().unwrap();
    }
    let (a, b) = (
        whole.logits().wait().unwrap(),
        step.logits().wait().unwrap(),
    );
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-3,
        "one-token decoding differs from batched decoding by {diff}"
    );
}

#[test]
fn token_log_probs_match_step_by_step_logits_and_give_a_perplexity() {
    let _model = common::one_model_at_a_time();
    let engine = engine_with(512);
    let tokens = engine.tokenize(PROMPT, true).wait().unwrap();
    let from = 3;
    let lp = engine.token_log_probs(tokens.clone(), from).wait().unwrap();
    assert_eq!(lp.len(), tokens.len() - from - 1);
    let seq = engine.sequence().unwrap();
    for (i, &tok) in tokens.iter().enumerate().take(tokens.len() - 1) {
        seq.append_tokens(vec![tok]).wait().unwrap();
        if i >= from {
            let logits = seq.logits().wait().unwrap();
            let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            let want = logits[tokens[i + 1] as usize] as f64 - lse;
            assert!((lp[i - from] as f64 - want).abs() < 2e-3, "position {i}");
        }
    }
    // Too long for the context: a typed error, not a crash.
    match engine.token_log_probs(vec![1; 600], 0).wait() {
        Err(Error::ContextOverflow { needed: 600, .. }) => {}
        other => panic!("{other:?}"),
    }
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let p =
        geek_backend::perplexity::perplexity(&engine, &text, 64, Some(3), |_, _, _| {}).unwrap();
    assert_eq!((p.chunks, p.scored), (3, 3 * 31));
    // A repeated sentence is easy to predict after its first occurrence.
    assert!(p.ppl > 1.0 && p.ppl < 3.0, "{}", p.ppl);
}
