//! `geek bench agent`: where an excavation's time goes.
//!
//! Each question is excavated and its trace's per-action timings are summed: prompt
//! processing, generation (of which sampling and grammar), retrieval, and the rest. The
//! "ideal" time is what llama.cpp's kernels alone would take for the same tokens at the rates
//! `geek bench backend` measures on the same engine (prefilled / pp-rate + generated /
//! tg-rate); wall ÷ ideal is the overhead the rest of geek adds.

use std::collections::BTreeMap;
use std::time::Instant;

use futures::StreamExt;
use geek_agent::{ActionTiming, Excavator, Trace};
use serde::Serialize;

use crate::Result;

/// The summed timings of some questions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Breakdown {
    /// Wall seconds (for a run: of the whole run, overlapping questions counted once).
    pub wall_seconds: f64,
    /// Seconds decoding prompts (appends, the prompt part of generations, scoring).
    pub prefill_seconds: f64,
    /// Seconds generating, sampling included.
    pub generation_seconds: f64,
    /// Of which choosing tokens (sampler and grammar).
    pub sampling_seconds: f64,
    /// Seconds waiting for the retriever.
    pub retrieval_seconds: f64,
    /// Wall time not in the above (scheduling, tokenizing, the agent's own work, queueing).
    pub other_seconds: f64,
    /// Prompt tokens decoded.
    pub prefilled: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Tokens drafted by prompt lookup.
    pub drafted: usize,
    /// Drafted tokens kept.
    pub accepted: usize,
    /// prefilled / pp-rate + generated / tg-rate.
    pub ideal_seconds: f64,
    /// wall / ideal.
    pub overhead: f64,
    /// Generated tokens per second of generation time.
    pub generation_rate: f64,
}

impl Breakdown {
    fn add_timing(&mut self, t: &ActionTiming) {
        self.prefill_seconds += t.prefill_seconds;
        self.generation_seconds += t.generation_seconds;
        self.sampling_seconds += t.sampling_seconds;
        self.retrieval_seconds += t.retrieval_seconds;
        self.prefilled += t.prefilled;
        self.generated += t.generated;
        self.drafted += t.drafted;
        self.accepted += t.accepted;
    }

    fn finish(&mut self, wall: f64, rates: Rates) {
        self.wall_seconds = wall;
        self.other_seconds =
            (wall - self.prefill_seconds - self.generation_seconds - self.retrieval_seconds)
                .max(0.0);
        self.ideal_seconds = self.prefilled as f64 / rates.prompt_tokens_per_second
            + self.generated as f64 / rates.generation_tokens_per_second;
        self.overhead = wall / self.ideal_seconds.max(1e-9);
        self.generation_rate = self.generated as f64 / self.generation_seconds.max(1e-9);
    }
}

/// Tokens per action kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ActionTokens {
    /// Actions of this kind.
    pub count: usize,
    /// Prompt tokens decoded.
    pub prefilled: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Seconds.
    pub seconds: f64,
}

/// The engine's raw rates the ideal time is computed from.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rates {
    /// Prompt processing (pp512).
    pub prompt_tokens_per_second: f64,
    /// Generation (tg64).
    pub generation_tokens_per_second: f64,
}

/// One question's figures.
#[derive(Debug, Clone, Serialize)]
pub struct QuestionBench {
    /// The question.
    pub question: String,
    /// Its breakdown.
    pub breakdown: Breakdown,
}

/// What `geek bench agent` reports.
#[derive(Debug, Clone, Serialize)]
pub struct AgentBench {
    /// The engine's rates.
    pub rates: Rates,
    /// Questions answered at once.
    pub parallel: usize,
    /// Per question.
    pub questions: Vec<QuestionBench>,
    /// All questions (wall time of the whole run).
    pub total: Breakdown,
    /// Tokens and time per action kind (`final` for the final answer).
    pub by_action: BTreeMap<String, ActionTokens>,
}

/// Excavates `questions`, `parallel` at a time, and breaks their time down.
pub async fn run(
    agent: &Excavator,
    questions: &[String],
    parallel: usize,
    rates: Rates,
) -> Result<AgentBench> {
    let started = Instant::now();
    let traces: Vec<Result<(Trace, f64)>> = futures::stream::iter(questions)
        .map(|q| async move {
            let t = Instant::now();
            let trace = agent.run(q).await?;
            Ok((trace, t.elapsed().as_secs_f64()))
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    let wall = started.elapsed().as_secs_f64();
    let mut total = Breakdown::default();
    let mut by_action: BTreeMap<String, ActionTokens> = BTreeMap::new();
    let mut per_question = Vec::new();
    for result in traces {
        let (trace, seconds) = result?;
        let mut b = Breakdown::default();
        for branch in &trace.branches {
            let mut timed: Vec<(String, &ActionTiming)> = branch
                .actions
                .iter()
                .map(|a| (a.action.keyword().to_string(), &a.timing))
                .collect();
            timed.push(("final".into(), &branch.final_timing));
            for (kind, t) in timed {
                b.add_timing(t);
                total.add_timing(t);
                let e = by_action.entry(kind).or_default();
                e.count += 1;
                e.prefilled += t.prefilled;
                e.generated += t.generated;
                e.seconds += t.seconds;
            }
        }
        b.finish(seconds, rates);
        per_question.push(QuestionBench {
            question: trace.question.clone(),
            breakdown: b,
        });
    }
    total.finish(wall, rates);
    Ok(AgentBench {
        rates,
        parallel,
        questions: per_question,
        total,
        by_action,
    })
}

/// The report as a Markdown table: one row per question and the total.
pub fn markdown(bench: &AgentBench) -> String {
    let mut s = format!(
        "engine: pp {:.1} tok/s, tg {:.1} tok/s; {} question(s), parallel {}\n\n",
        bench.rates.prompt_tokens_per_second,
        bench.rates.generation_tokens_per_second,
        bench.questions.len(),
        bench.parallel
    );
    s.push_str("| question | wall s | prefill s | generation s | sampling s | retrieval s | other s | prefilled | generated | drafted / kept | gen tok/s | ideal s | wall ÷ ideal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let row = |name: &str, b: &Breakdown| {
        format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} / {} | {:.1} | {:.2} | {:.2} |\n",
            b.wall_seconds,
            b.prefill_seconds,
            b.generation_seconds,
            b.sampling_seconds,
            b.retrieval_seconds,
            b.other_seconds,
            b.prefilled,
            b.generated,
            b.drafted,
            b.accepted,
            b.generation_rate,
            b.ideal_seconds,
            b.overhead
        )
    };
    for q in &bench.questions {
        let name: String = q.question.chars().take(40).collect();
        s.push_str(&row(&name, &q.breakdown));
    }
    s.push_str(&row("**total**", &bench.total));
    s.push_str(
        "\n| action | count | prefilled | generated | seconds |\n|---|---:|---:|---:|---:|\n",
    );
    for (kind, a) in &bench.by_action {
        s.push_str(&format!(
            "| {kind} | {} | {} | {} | {:.2} |\n",
            a.count, a.prefilled, a.generated, a.seconds
        ));
    }
    s
}
