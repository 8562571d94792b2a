//! The final answer: a short prompt of its own holding the question and the facts found.

use std::time::Instant;

use geek_backend::{GenerateParams, Sampling, StopReason};

use crate::model::AgentModel;
use crate::prompts;
use crate::trace::{ActionTiming, TokenCounts};
use crate::Result;

/// The final answer of `question` from `facts`: the reasoning line (with `reasoning` on;
/// empty otherwise), the scores of yes and no, and the tokens and time it took.
pub(super) async fn final_answer(
    model: &dyn AgentModel,
    question: &str,
    facts: &[(String, String)],
    reasoning: bool,
    on_piece: &mut (dyn FnMut(&str) + Send),
) -> Result<(String, Vec<f32>, TokenCounts, ActionTiming)> {
    let mut counts = TokenCounts::default();
    let mut timing = ActionTiming::default();
    let system = if reasoning {
        prompts::FINAL_REASONING_SYSTEM
    } else {
        prompts::FINAL_SYSTEM
    };
    let prompt = model
        .chat_prompt(system, &prompts::final_user(question, facts))
        .await?;
    let seq = model.answer_sequence().await?;
    let started = Instant::now();
    let stats = seq.append_parts(&prompt).await?;
    counts.add_prefill(&stats);
    timing.add_prefill(&stats, started.elapsed().as_secs_f64());
    if !reasoning {
        counts.add_prefill(&seq.append(prompts::ANSWER_PREFIX).await?);
        let started = Instant::now();
        let scores = seq.score(&[prompts::YES, prompts::NO]).await?;
        timing.prefill_seconds += started.elapsed().as_secs_f64();
        return Ok((String::new(), scores, counts, timing));
    }
    counts.add_prefill(&seq.append(prompts::REASONING_PREFIX).await?);
    let params = GenerateParams {
        max_tokens: 64,
        sampling: Sampling::greedy(),
        stop: vec!["\n".into()],
        grammar: Some(prompts::LINE_GRAMMAR.into()),
        ignore_eos: false,
        logprobs: 0,
    };
    let done = seq.generate(params, on_piece).await?;
    counts.add_generation(&done);
    timing.add_generation(&done);
    let close = if done.stop == StopReason::MaxTokens {
        "\n"
    } else {
        ""
    };
    counts.add_prefill(
        &seq.append(&format!("{close}{}", prompts::ANSWER_PREFIX))
            .await?,
    );
    let started = Instant::now();
    let scores = seq.score(&[prompts::YES, prompts::NO]).await?;
    timing.prefill_seconds += started.elapsed().as_secs_f64();
    Ok((done.text.trim().to_string(), scores, counts, timing))
}
