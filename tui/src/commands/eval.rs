//! `geek eval …`.

use anyhow::Result;
use geek_evals::{retrieval, strategyqa};
use geek_retriever::Bm25Index;

use crate::cli::EvalCommand;
use crate::config::Resolved;

pub fn run(cmd: EvalCommand, config: &Resolved) -> Result<()> {
    match cmd {
        EvalCommand::Retrieval {
            split,
            mode,
            k,
            json,
        } => {
            let split: strategyqa::Split = split.parse().map_err(anyhow::Error::msg)?;
            let questions = strategyqa::load(&split.path(&config.data_dir))?;
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
        }
    }
    Ok(())
}
