//! `geek bench backend`.

use anyhow::Result;
use geek_backend::{bench, Engine};
use serde::Serialize;

use crate::cli::BenchBackendArgs;
use crate::config::Resolved;

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
    let engine = Engine::load(engine_config)?;
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
