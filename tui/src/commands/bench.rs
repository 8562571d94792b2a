//! `geek bench backend` and `geek bench agent`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use anyhow::Result;
use geek_backend::bench;
use serde::Serialize;

use std::sync::Arc;

use crate::config::{AgentOptions, Resolved};

#[derive(Serialize)]
struct Report {
    model: String,
    threads: i32,
    n_params: u64,
    results: Vec<bench::BenchResult>,
}

pub fn backend(args: BenchBackendArgs, config: &Resolved) -> Result<()> {
    let mut engine_config = config.engine_config()?;
    let longest_pp = args.pp.iter().copied().max().unwrap_or(0);
    engine_config.n_batch = (longest_pp as u32).clamp(512, 2048);
    engine_config.n_ubatch = 512;
    let engine = config.load(engine_config)?;
    let results = bench::run_suite(
        &engine,
        &args.pp,
        &args.tg,
        &args.parallel,
        args.batched_tokens,
        args.repetitions,
    )?;
    let report = Report {
        model: engine.info().path.display().to_string(),
        threads: config.threads,
        n_params: engine.info().n_params,
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model: {}  threads: {}", report.model, report.threads);
    println!("| test | parallel | t/s |");
    println!("|---|---:|---:|");
    for r in &report.results {
        println!(
            "| {} | {} | {:.2} ± {:.2} |",
            r.test, r.parallel, r.tokens_per_second, r.stddev
        );
    }
    let batched = |p: usize| {
        report
            .results
            .iter()
            .find(|r| r.test.starts_with("batched") && r.parallel == p)
    };
    if let (Some(one), Some(most)) = (
        batched(1),
        args.parallel.iter().max().and_then(|&p| batched(p)),
    ) {
        println!(
            "batched speed-up at {} sequences: {:.2}x",
            most.parallel,
            most.tokens_per_second / one.tokens_per_second
        );
    }
    Ok(())
}

pub fn agent(args: BenchAgentArgs, config: &Resolved) -> Result<()> {
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    let questions = bench_questions(&args, config)?;
    let engine = config.load_engine(args.parallel, 1)?;
    // The raw rates, on this engine, before the agent runs.
    let raw = bench::run_suite(&engine, &[512], &[64], &[], 0, 1)?;
    let rate = |prefix: &str| {
        raw.iter()
            .find(|r| r.test.starts_with(prefix))
            .map_or(1.0, |r| r.tokens_per_second)
    };
    let rates = geek_evals::agent_bench::Rates {
        prompt_tokens_per_second: rate("pp"),
        generation_tokens_per_second: rate("tg"),
    };
    let index: Arc<dyn geek_retriever::Retriever> = Arc::new(config.open_index()?);
    let options = AgentOptions {
        max_steps: 8,
        explore: 1,
        pre_answer: false,
        retrieval: true,
        passages: 3,
        seed: 0,
        context_limit: (args.parallel > 1).then_some(crate::config::CONTEXT_PER_QUESTION as usize),
        demonstrations: 0,
        final_reasoning: false,
    };
    let agent = config.excavator(config.local(engine), Some(index), &options)?;
    let runtime = config.runtime()?;
    let report = runtime.block_on(geek_evals::agent_bench::run(
        &agent,
        &questions,
        args.parallel,
        rates,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", geek_evals::agent_bench::markdown(&report));
    }
    Ok(())
}

/// The questions of `geek bench agent`: a file of them, or the first of a split.
fn bench_questions(args: &BenchAgentArgs, config: &Resolved) -> Result<Vec<String>> {
    let mut questions: Vec<String> = match &args.questions {
        Some(path) if path.extension().is_some_and(|e| e == "json") => {
            geek_evals::strategyqa::load(path)?
                .into_iter()
                .map(|q| q.question)
                .collect()
        }
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => {
            let path = match &args.split {
                geek_evals::strategyqa::Split::Path(p) => p.clone(),
                named => named.path(config.require_data_dir()?),
            };
            geek_evals::strategyqa::load(&path)?
                .into_iter()
                .map(|q| q.question)
                .collect()
        }
    };
    questions.truncate(args.limit);
    anyhow::ensure!(!questions.is_empty(), "no questions to run");
    Ok(questions)
}

/// `geek bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// llama-bench style throughput of the llama.cpp backend.
    Backend(BenchBackendArgs),
    /// Where an excavation's time goes, against the engine's raw pp/tg rates.
    Agent(BenchAgentArgs),
    /// Load test of an OpenAI-compatible server (geek serve, llama-server).
    Http(super::bench_http::BenchHttpArgs),
}

/// `geek bench agent`
#[derive(Debug, Args)]
pub struct BenchAgentArgs {
    /// Questions: a StrategyQA JSON file or a text file with one question per line
    /// (default: --split).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// StrategyQA split the questions come from when --questions is not given.
    #[arg(long, default_value = "dev")]
    pub split: geek_evals::strategyqa::Split,
    /// Only the first N questions.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Questions excavated at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `geek bench backend`
#[derive(Debug, Args)]
pub struct BenchBackendArgs {
    /// Prompt lengths to measure (pp).
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub pp: Vec<usize>,
    /// Generation lengths to measure (tg).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub tg: Vec<usize>,
    /// Parallel sequences for batched generation.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub parallel: Vec<usize>,
    /// Tokens each parallel sequence generates.
    #[arg(long, default_value_t = 64)]
    pub batched_tokens: usize,
    /// Measured repetitions per test (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
