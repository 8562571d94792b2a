//! `geek eval …`.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Result;
use geek_agent::{Excavator, ExcavatorConfig};
use geek_backend::Engine;
use geek_evals::methods::Method;
use geek_evals::run::{self, RunSpec};
use geek_evals::{retrieval, strategyqa};
use geek_retriever::{Bm25Index, Retriever};

use crate::cli::{EvalCommand, EvalQaArgs};
use crate::config::Resolved;

/// Tokens one question may use when several share the engine.
const CONTEXT_PER_QUESTION: u32 = 4096;

pub fn run(cmd: EvalCommand, config: &Resolved) -> Result<()> {
    match cmd {
        EvalCommand::Strategyqa(args) => strategyqa_run(args, config),
        EvalCommand::Report { dirs, out } => {
            let runs = geek_evals::report::find_runs(&dirs)?;
            anyhow::ensure!(!runs.is_empty(), "no results_*.json in {dirs:?}");
            let out = out.unwrap_or_else(|| dirs[0].clone());
            print!("{}", geek_evals::report::markdown(&runs));
            for f in geek_evals::report::write_report(&runs, &out)? {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        EvalCommand::Retrieval {
            split,
            mode,
            k,
            json,
        } => {
            let split: strategyqa::Split = split.parse().map_err(anyhow::Error::msg)?;
            let questions = strategyqa::load(&dataset_path(&split, config)?)?;
            let index = Bm25Index::open(&config.index_dir)?;
            let report = retrieval::evaluate(&index, &questions, mode, k)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "Recall@{} ({:?} queries) = {:.4} over {} questions with gold evidence ({} in the split); index of {} passages; {:.1} s",
                    report.k, report.mode, report.recall, report.scored, report.questions, report.index_documents, report.seconds
                );
            }
            Ok(())
        }
    }
}

/// The file of a split: a path as given, a named split under the data directory.
fn dataset_path(split: &strategyqa::Split, config: &Resolved) -> Result<std::path::PathBuf> {
    Ok(match split {
        strategyqa::Split::Path(p) => p.clone(),
        named => named.path(config.require_data_dir()?),
    })
}

fn strategyqa_run(args: EvalQaArgs, config: &Resolved) -> Result<()> {
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    let split: strategyqa::Split = args.split.parse().map_err(anyhow::Error::msg)?;
    let dataset = dataset_path(&split, config)?;
    // Every question is checked before any work starts.
    let questions = strategyqa::load(&dataset)?;
    let needs_index = matches!(args.method, Method::Rag | Method::Geek);
    let index = if needs_index {
        Some(Bm25Index::open(&config.index_dir)?)
    } else {
        None
    };

    let mut engine_config = config.engine_config()?;
    let parallel = args.parallel.max(1) as u32;
    engine_config.n_ctx = engine_config.n_ctx.max(CONTEXT_PER_QUESTION * parallel);
    engine_config.max_sequences = (parallel * (args.explore as u32 + 2) + 4).min(256);
    let model_sha256 = geek_backend::catalog::sha256_cached(&engine_config.model)?;
    let spec = RunSpec {
        method: args.method,
        split: args.split.clone(),
        dataset,
        limit: args.limit,
        parallel: args.parallel,
        explore: args.explore,
        max_steps: args.max_steps,
        seed: args.seed,
        model: engine_config.model.clone(),
        model_sha256,
        index: needs_index.then(|| config.index_dir.clone()),
        prompts_version: run::prompts_version(args.method),
        out_dir: args.out.clone(),
    };
    let engine = Engine::load(engine_config)?;
    let retriever: Option<Arc<dyn Retriever>> = index.map(|i| Arc::new(i) as Arc<dyn Retriever>);
    let agent = if args.method == Method::Geek {
        let mut builder = Excavator::builder()
            .backend(engine.clone())
            .config(ExcavatorConfig {
                max_steps: args.max_steps,
                explore: args.explore,
                seed: args.seed,
                context_limit: Some(CONTEXT_PER_QUESTION as usize),
                ..ExcavatorConfig::default()
            });
        if let Some(r) = &retriever {
            builder = builder.retriever(r.clone());
        }
        Some(builder.build()?)
    } else {
        None
    };
    let answerer = run::answerer(Arc::new(engine), retriever, agent);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bar = crate::progress::run_bar(std::io::stderr().is_terminal());
    let mut on_progress = |p: run::RunProgress| crate::progress::show_run(&bar, p);
    let outcome = runtime.block_on(run::run(spec, &questions, answerer, None, &mut on_progress))?;
    bar.finish_and_clear();
    if outcome.damaged_lines > 0 {
        eprintln!(
            "warning: {} damaged line(s) in {} were skipped; their questions were answered again",
            outcome.damaged_lines,
            outcome.files.samples.display()
        );
    }
    let m = &outcome.results.results["strategyqa"];
    match (m.acc, m.acc_stderr) {
        (Some(acc), Some(se)) => println!(
            "{}: accuracy {:.4} ± {:.4} ({} of {}), {:.1} questions/min",
            args.method.name(),
            acc,
            se,
            m.correct.unwrap_or(0),
            m.n,
            outcome.results.questions_per_minute
        ),
        _ => println!(
            "{}: {} predictions written to {}",
            args.method.name(),
            m.n,
            outcome.files.predictions.display()
        ),
    }
    if let Some(r) = m.recall_at_10 {
        println!("Recall@10 of retrieved passages: {r:.4}");
    }
    println!(
        "results: {}\nsamples: {}",
        outcome.files.results.display(),
        outcome.files.samples.display()
    );
    Ok(())
}
