//! `geek ask`: one question, excavated with the default model and index.

use clap::Args;

use std::io::Write;

use std::sync::Arc;

use anyhow::{Context, Result};
use geek_agent::{AnswerSource, Event};
use geek_retriever::Retriever;

use crate::config::{AgentOptions, Resolved};

pub fn run(args: AskArgs, config: &Resolved) -> Result<()> {
    let model = config.load_model(&args.remote, 1, args.explore)?;
    let retriever: Option<Arc<dyn Retriever>> = if args.no_retrieval {
        None
    } else {
        Some(
            config
                .open_retriever()
                .context("retrieval needs the passage index (or pass --no-retrieval)")?,
        )
    };
    let options = AgentOptions {
        max_steps: args.max_steps,
        explore: args.explore,
        pre_answer: args.pre_answer,
        retrieval: !args.no_retrieval,
        passages: args.passages,
        seed: 0,
        context_limit: None,
        demonstrations: args.demos,
        final_reasoning: false,
    };
    let agent = config.excavator(model.clone(), retriever, &options)?;
    let runtime = config.runtime()?;
    let agent = if args.no_calibration {
        agent
    } else {
        runtime.block_on(config.calibrate_agent(&model, agent))?
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let json = args.json;
    let printer = std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        while let Some(event) = rx.blocking_recv() {
            if !json {
                let _ = print_event(&mut out, &event);
            }
        }
    });
    let trace = runtime.block_on(agent.run_streaming(&args.question, tx));
    let _ = printer.join();
    let trace = trace?;
    if json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
        return Ok(());
    }
    let f = &trace.main_branch().final_answer;
    let calibration = trace.calibration.as_ref().map_or(String::new(), |c| {
        format!("; calibration {:+.2} ({c})", trace.answer_offset)
    });
    println!(
        "\nAnswer: {} (votes yes {} / no {}; log p(yes) {:.3}, log p(no) {:.3}{calibration})",
        if trace.answer { "yes" } else { "no" },
        trace.yes_votes,
        trace.no_votes,
        f.yes_logprob,
        f.no_logprob
    );
    for (i, step) in trace.main_branch().steps.iter().enumerate() {
        if let (Some(answer), Some(source)) = (&step.answer, &step.source) {
            let from = match source {
                AnswerSource::Retrieved {
                    unsupported: Some(_),
                    ..
                } => "model; the passages did not answer".into(),
                AnswerSource::Retrieved { cited, .. } if !cited.is_empty() => cited.join(", "),
                AnswerSource::Retrieved { .. } => "retrieved, uncited".into(),
                AnswerSource::Model => "model".into(),
            };
            println!("  #{} {answer} ({from})", i + 1);
        }
    }
    println!(
        "  {:.1} s, {} tokens decoded ({} unique, {} without KV reuse)",
        trace.seconds, trace.tokens.decoded, trace.tokens.unique, trace.tokens.without_reuse
    );
    Ok(())
}

fn print_event(out: &mut impl Write, event: &Event) -> std::io::Result<()> {
    let tag = |b: &usize| {
        if *b == 0 {
            String::new()
        } else {
            format!("[branch {b}] ")
        }
    };
    match event {
        Event::SubQuestion { branch, text } => writeln!(out, "{}Q: {text}", tag(branch)),
        Event::Retrieved {
            branch,
            query,
            passages,
        } => {
            let titles: Vec<String> = passages
                .iter()
                .map(|p| format!("{} ({})", p.title, p.id))
                .collect();
            writeln!(
                out,
                "{}   search {query:?} -> {}",
                tag(branch),
                titles.join("; ")
            )
        }
        Event::FactExtracted {
            branch,
            fact,
            citations,
        } => {
            let cite = if citations.is_empty() {
                String::new()
            } else {
                format!(" [{}]", citations.join(", "))
            };
            writeln!(out, "{}   A: {fact}{cite}", tag(branch))
        }
        Event::BranchAnswered { branch, answer } => writeln!(
            out,
            "{}   summary: {}{}",
            tag(branch),
            answer.summary,
            if answer.forced {
                " (answer forced)"
            } else {
                ""
            }
        ),
        Event::Error { branch, message } => writeln!(out, "{}   ! {message}", tag(branch)),
        _ => Ok(()),
    }
}

/// `geek ask`
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The yes/no question.
    pub question: String,
    /// Where the model runs.
    #[command(flatten)]
    pub remote: crate::cli::RemoteArgs,
    /// Actions per branch before the final answer is forced.
    #[arg(long, default_value_t = 8)]
    pub max_steps: usize,
    /// Branches to explore; their answers are voted.
    #[arg(long, default_value_t = 1)]
    pub explore: usize,
    /// Answer sub-questions from the model alone.
    #[arg(long)]
    pub no_retrieval: bool,
    /// Draft remaining sub-questions with guessed answers to guide retrieval.
    #[arg(long)]
    pub pre_answer: bool,
    /// Passages shown per retrieval.
    #[arg(long, default_value_t = 3)]
    pub passages: usize,
    /// Print the trace as JSON instead of the excavation as it happens.
    #[arg(long)]
    pub json: bool,
    /// Answer by the raw yes/no log-probabilities, without the calibration offset.
    #[arg(long)]
    pub no_calibration: bool,
    /// Solved StrategyQA train questions shown before the question (the most similar ones).
    #[arg(long, default_value_t = 0)]
    pub demos: usize,
}
