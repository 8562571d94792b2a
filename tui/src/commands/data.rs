//! `geek data trajectories`: gold excavations, or their final answers, as training examples.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};

use anyhow::{bail, Context, Result};
use geek_agent::{prompts, AgentModel};
use geek_evals::strategyqa::{self, Split};
use geek_evals::trajectories::{gold_trajectory, Skipped};
use geek_retriever::Bm25Index;

use crate::config::Resolved;

pub fn trajectories(args: TrajectoriesArgs, config: &Resolved) -> Result<()> {
    let split = &args.split;
    let path = match split {
        Split::Train => split.path(config.require_data_dir()?),
        Split::Path(p) => p.clone(),
        Split::Dev | Split::Full => {
            bail!(
                "`{}` contains the dev questions: training data comes from `train` only",
                args.split
            )
        }
        Split::Test => bail!("the test split has no answers to train on"),
    };
    let mut questions = strategyqa::load(&path)?;
    if let Some(n) = args.limit {
        questions.truncate(n);
    }
    let index = Bm25Index::open(&config.index_dir)?;
    // The chat template comes from the model the agent will run.
    let engine = config.load(config.engine_config()?.with_n_ctx(512))?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let tmp = args.out.with_extension("jsonl.partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    let (mut written, mut no_decomposition, mut unstated) = (0usize, 0usize, 0usize);
    for q in &questions {
        match gold_trajectory(q, &index, args.passages)? {
            Ok(t) => {
                let (system, user) = match args.render {
                    Render::Trajectory => (prompts::SYSTEM, t.user_turn()),
                    Render::FinalAnswer => (prompts::FINAL_SYSTEM, t.final_user_turn()),
                };
                let parts = runtime.block_on(AgentModel::chat_prompt(&engine, system, &user))?;
                let chat: String = parts.iter().map(|p| p.text.as_str()).collect();
                let ex = match args.render {
                    Render::Trajectory => t.render(&chat),
                    Render::FinalAnswer => t.render_final_answer(&chat),
                };
                let mut line = serde_json::json!({
                    "qid": q.qid,
                    "prompt": ex.prompt,
                    "completion": ex.completion,
                });
                if !ex.context.is_empty() {
                    line["context"] = serde_json::json!(ex.context);
                }
                writeln!(out, "{line}")?;
                written += 1;
            }
            Err(Skipped::UnstatedStep) => unstated += 1,
            Err(Skipped::NoDecomposition) => no_decomposition += 1,
            Err(Skipped::NoAnswer) => bail!("{} has no gold answer", q.qid),
        }
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, &args.out)?;
    println!(
        "wrote {written} trajectories to {} (skipped: {unstated} with a computed step no fact states, {no_decomposition} without decomposition)",
        args.out.display()
    );
    Ok(())
}

/// `geek data …`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Render StrategyQA train questions as gold excavations in the agent's prompt format:
    /// JSONL `{qid, prompt, completion}` for `geek compress finetune`.
    Trajectories(TrajectoriesArgs),
}

/// `geek data trajectories`
#[derive(Debug, Args)]
pub struct TrajectoriesArgs {
    /// `train` or a file path; dev is refused (never train on what is evaluated).
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Passages shown per retrieval (the agent's default is 3).
    #[arg(long, default_value_t = 3)]
    pub passages: usize,
    /// What each line holds: the whole excavation (`trajectory`), or only the final answer
    /// from the gold facts in its own short prompt (`final-answer`: one target token, about
    /// 150 tokens a line).
    #[arg(long, value_enum, default_value_t = Render::Trajectory)]
    pub render: Render,
}

/// What `geek data trajectories` renders per question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Render {
    /// The whole gold excavation after the agent's system prompt.
    Trajectory,
    /// The final answer's prompt with the gold facts, then " yes" or " no".
    FinalAnswer,
}
