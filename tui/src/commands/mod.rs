//! One module per subcommand.

mod ask;
mod bench;
mod compress;
mod data;
mod eval;
mod generate;
mod index;
mod model;
mod ppl;

use anyhow::Result;

use crate::cli::{BenchCommand, Command, CompressCommand, DataCommand, IndexCommand};
use crate::config::Resolved;

/// Runs a parsed command.
pub fn run(command: Command, config: &Resolved) -> Result<()> {
    match command {
        Command::Tui => crate::app::run(config),
        Command::Model(cmd) => model::run(cmd, config),
        Command::Ask(args) => ask::run(args, config),
        Command::Generate(args) => generate::run(args, config),
        Command::Bench(BenchCommand::Backend(args)) => bench::backend(args, config),
        Command::Bench(BenchCommand::Agent(args)) => bench::agent(args, config),
        Command::Index(IndexCommand::Build {
            corpora,
            vital_only,
            out,
        }) => index::build(corpora, vital_only, out, config),
        Command::Search(args) => index::search(args, config),
        Command::Eval(cmd) => eval::run(cmd, config),
        Command::Ppl(args) => ppl::run(args, config),
        Command::Data(DataCommand::Trajectories(args)) => data::trajectories(args, config),
        Command::Compress(cmd) => match *cmd {
            CompressCommand::Finetune(args) => compress::finetune(args, config),
            CompressCommand::Export(args) => compress::export(args, config),
            CompressCommand::Quantize(args) => compress::quantize(args, config),
            CompressCommand::Pipeline(args) => compress::pipeline(args, config),
            CompressCommand::Dequantize { out, r#type } => {
                compress::dequantize(&out, &r#type, config)
            }
        },
    }
}
