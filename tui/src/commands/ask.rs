//! `geek ask`: one question, excavated with the default model and index.

use std::io::Write;

use anyhow::{Context, Result};
use geek_agent::{AnswerSource, Event, Excavator, ExcavatorConfig};
use geek_backend::Engine;
use geek_retriever::Bm25Index;

use crate::cli::AskArgs;
use crate::config::Resolved;

pub fn run(args: AskArgs, config: &Resolved) -> Result<()> {
    let engine = Engine::load(config.engine_config()?)?;
    let mut builder = Excavator::builder()
        .backend(engine)
        .config(ExcavatorConfig {
            max_steps: args.max_steps,
            explore: args.explore,
            pre_answer: args.pre_answer,
            retrieval: !args.no_retrieval,
            passages: args.passages,
            ..ExcavatorConfig::default()
        });
    if !args.no_retrieval {
        let index = Bm25Index::open(&config.index_dir)
            .context("retrieval needs the passage index (or pass --no-retrieval)")?;
        builder = builder.retriever(index);
    }
    let agent = builder.build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
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
    println!(
        "\nAnswer: {} (votes yes {} / no {}; log p(yes) {:.3}, log p(no) {:.3})",
        if trace.answer { "yes" } else { "no" },
        trace.yes_votes,
        trace.no_votes,
        f.yes_logprob,
        f.no_logprob
    );
    for (i, step) in trace.main_branch().steps.iter().enumerate() {
        if let (Some(answer), Some(source)) = (&step.answer, &step.source) {
            let from = match source {
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
