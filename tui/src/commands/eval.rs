//! `geek eval …`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Result;
use geek_evals::calibration::{self, CalibrationKey};
use geek_evals::methods::{Answerer, Method};
use geek_evals::run::{self, RunSpec};
use geek_evals::{retrieval, strategyqa};
use geek_retriever::Retriever;

use crate::config::{AgentOptions, Resolved, CONTEXT_PER_QUESTION};

pub fn run(cmd: EvalCommand, config: &Resolved) -> Result<()> {
    match cmd {
        EvalCommand::Strategyqa(args) => strategyqa_run(args, config),
        EvalCommand::Calibrate(args) => calibrate(args, config),
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
            source,
            k,
            json,
        } => {
            let questions = strategyqa::load(&dataset_path(&split, config)?)?;
            let source = source.unwrap_or(config.retriever);
            let passages = config.open_passages(source)?;
            let search = |q: &str, k: usize| passages.search(q, k);
            let documents = passages.bm25().meta().documents;
            let report = retrieval::evaluate(&search, documents, &questions, mode, k)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "Recall@{} ({:?} queries, {source:?}) = {:.4} over {} questions with gold evidence ({} in the split); index of {} passages; {:.1} s, query p50 {:.1} ms",
                    report.k, report.mode, report.recall, report.scored, report.questions, report.index_documents, report.seconds, report.latency_p50_ms
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

/// Runs (or resumes) `args.method` on the questions of `args.split`, with the calibration
/// offsets known for it when `calibrate` is set.
// Longer than 80 lines: assembles a run from its flags (dataset, index, model, spec, agent, calibration, progress bar) in the order each needs the one before.
fn answer_questions(
    args: &EvalQaArgs,
    split: &strategyqa::Split,
    config: &Resolved,
    calibrate: bool,
) -> Result<run::RunOutcome> {
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    let dataset = dataset_path(split, config)?;
    // Every question is checked before any work starts.
    let questions = strategyqa::load(&dataset)?;
    let passages = if args.method.retrieves() {
        Some(config.open_passages(config.retriever)?)
    } else {
        None
    };
    let model = config.load_model(&args.remote, args.parallel, args.explore)?;
    let (model_file, model_sha256) = model.identity()?;
    let spec = RunSpec {
        method: args.method,
        split: split.to_string(),
        dataset,
        limit: args.limit,
        // `--parallel` questions in flight per model server.
        parallel: args.parallel * model.servers(),
        explore: args.explore,
        max_steps: args.max_steps,
        seed: args.seed,
        pre_answer: args.pre_answer,
        passages: args.passages,
        demonstrations: args.demos,
        final_reasoning: args.final_reasoning,
        model: model_file,
        model_sha256,
        index: passages.is_some().then(|| config.index_dir.clone()),
        retriever: passages.as_ref().and_then(|p| p.identity()),
        prompts_version: args.method.prompt_version().to_string(),
        out_dir: args.out.clone(),
    };
    let retriever: Option<Arc<dyn Retriever>> = passages.map(|p| p.retriever());
    let agent = if args.method == Method::Geek {
        let options = AgentOptions {
            max_steps: args.max_steps,
            explore: args.explore,
            pre_answer: args.pre_answer,
            retrieval: retriever.is_some(),
            passages: args.passages,
            seed: args.seed,
            context_limit: Some(CONTEXT_PER_QUESTION as usize),
            demonstrations: args.demos,
            final_reasoning: args.final_reasoning,
        };
        Some(Arc::new(config.excavator(
            model.clone(),
            retriever.clone(),
            &options,
        )?))
    } else {
        None
    };
    let answerer = Answerer {
        model: model.agent_model()?,
        retriever,
        agent,
    };
    let runtime = config.runtime()?;
    let calibrations = if calibrate {
        let key = config.calibration_key(&model, args.method)?;
        let found = runtime.block_on(calibration::offsets_for(
            &config.calibration_store,
            &key,
            &answerer,
            args.method,
        ))?;
        found.iter().map(|c| (c.offset, c.describe())).collect()
    } else {
        Vec::new()
    };
    let bar = crate::progress::run_bar(std::io::stderr().is_terminal());
    let mut on_progress = |p: run::RunProgress| crate::progress::show_run(&bar, p);
    let outcome = runtime.block_on(run::run(
        spec,
        &questions,
        answerer,
        &calibrations,
        &mut on_progress,
    ))?;
    bar.finish_and_clear();
    if outcome.damaged_lines > 0 {
        eprintln!(
            "warning: {} damaged line(s) in {} were skipped; their questions were answered again",
            outcome.damaged_lines,
            outcome.files.samples.display()
        );
    }
    Ok(outcome)
}

fn strategyqa_run(args: EvalQaArgs, config: &Resolved) -> Result<()> {
    let split = args.split.clone().unwrap_or(strategyqa::Split::Dev);
    let outcome = answer_questions(&args, &split, config, true)?;
    let m = &outcome.results.results["strategyqa"];
    match (m.acc, m.acc_stderr) {
        (Some(acc), Some(se)) => println!(
            "{}: accuracy {:.4} ± {:.4} ({} of {}, {} yes), {:.1} questions/min",
            args.method,
            acc,
            se,
            m.correct.unwrap_or(0),
            m.n,
            m.yes_answers,
            outcome.results.questions_per_minute
        ),
        _ => println!(
            "{}: {} predictions written to {}",
            args.method,
            m.n,
            outcome.files.predictions.display()
        ),
    }
    for c in &m.calibrated {
        if let (Some(acc), Some(se)) = (c.acc, c.acc_stderr) {
            println!(
                "  calibrated ({}, offset {:+.3}): accuracy {acc:.4} ± {se:.4}, {} yes",
                c.source, c.offset, c.yes_answers
            );
        }
    }
    if let Some(auc) = m.auc {
        println!("  AUC of the yes/no margin: {auc:.3}");
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

/// Calibration is fitted on StrategyQA train questions only: the train split, or a file whose
/// every question is in it (never dev or test).
fn check_train_only(split: &strategyqa::Split, config: &Resolved) -> Result<()> {
    match split {
        strategyqa::Split::Train => Ok(()),
        strategyqa::Split::Path(path) => {
            let train =
                strategyqa::load(&strategyqa::Split::Train.path(config.require_data_dir()?))?;
            let known: std::collections::HashSet<&str> =
                train.iter().map(|q| q.qid.as_str()).collect();
            let asked = strategyqa::load(path)?;
            let outside = asked
                .iter()
                .filter(|q| !known.contains(q.qid.as_str()))
                .count();
            anyhow::ensure!(
                outside == 0,
                "{outside} question(s) of {} are not StrategyQA train questions; calibration is fitted on train only",
                path.display()
            );
            Ok(())
        }
        _ => anyhow::bail!(
            "calibration is fitted on --split train only (dev and test are for measuring)"
        ),
    }
}

/// `geek eval calibrate`: the method on train questions, then the offset that maximises their
/// accuracy, stored for `ask`, the TUI and `eval`.
fn calibrate(args: EvalQaArgs, config: &Resolved) -> Result<()> {
    let split = args.split.clone().unwrap_or(strategyqa::Split::Train);
    check_train_only(&split, config)?;
    let outcome = answer_questions(&args, &split, config, false)?;
    let key = CalibrationKey {
        model_sha256: outcome.results.config.model_sha256.clone(),
        method: args.method.name().to_string(),
        prompt_version: args.method.prompt_version().to_string(),
    };
    let samples = geek_evals::samples::read_samples(&outcome.files.samples)?.samples;
    let fitted = calibration::fit_and_store(&config.calibration_store, &key, &samples)?;
    if let calibration::CalibrationSource::Fitted {
        questions,
        raw_accuracy,
        calibrated_accuracy,
    } = fitted.source
    {
        println!(
            "{}: offset {:+.3} fitted on {questions} train questions (accuracy {raw_accuracy:.4} raw, {calibrated_accuracy:.4} calibrated); stored in {}",
            args.method,
            fitted.offset,
            config.calibration_store.display()
        );
    }
    Ok(())
}

/// `geek eval strategyqa`
#[derive(Debug, Args)]
pub struct EvalQaArgs {
    /// dev, train, full, test or a file path (default: dev; for calibrate: train).
    #[arg(long)]
    pub split: Option<strategyqa::Split>,
    /// direct, cot, rag, self-ask, ircot or geek.
    #[arg(long, default_value = "geek")]
    pub method: geek_evals::methods::Method,
    /// Where the model runs.
    #[command(flatten)]
    pub remote: crate::cli::RemoteArgs,
    /// Pre-answer drafting (geek).
    #[arg(long)]
    pub pre_answer: bool,
    /// Passages shown per retrieval (geek).
    #[arg(long, default_value_t = 3)]
    pub passages: usize,
    /// Solved StrategyQA train questions shown before each question (geek).
    #[arg(long, default_value_t = 0)]
    pub demos: usize,
    /// The final answer reasons in a sentence before answering (geek).
    #[arg(long)]
    pub final_reasoning: bool,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Questions answered at once: parallel sequences of one llama.cpp context, or per model
    /// server with `--endpoint`.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Branches explored per question (geek).
    #[arg(long, default_value_t = 1)]
    pub explore: usize,
    /// Step budget (geek).
    #[arg(long, default_value_t = 8)]
    pub max_steps: usize,
    /// Seed of sampled branches.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Output directory.
    #[arg(long, default_value = "runs")]
    pub out: PathBuf,
}

/// `geek eval …`
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Answer StrategyQA questions with a method and measure accuracy (resumable).
    Strategyqa(EvalQaArgs),
    /// Fit the yes/no decision offset of a method on StrategyQA train questions (resumable);
    /// `ask`, the TUI and `eval` apply it.
    Calibrate(EvalQaArgs),
    /// Compare runs: a Markdown table and PNG plots.
    Report {
        /// Directories holding results_*.json files.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to write report.md and the plots (default: the first directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Recall@10 of gold evidence paragraphs (official StrategyQA definition).
    Retrieval {
        /// dev, train, full, test or a file path.
        #[arg(long, default_value = "dev")]
        split: strategyqa::Split,
        /// question (IR-Q) or decomposition (IR-ORA-D).
        #[arg(long, default_value = "question")]
        mode: geek_evals::retrieval::QueryMode,
        /// bm25, dense or hybrid (default: --retriever).
        #[arg(long)]
        source: Option<crate::passages::PassageSource>,
        /// Cut-off.
        #[arg(short, long, default_value_t = 10)]
        k: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
