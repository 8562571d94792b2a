//! One module per subcommand.

pub mod ask;
pub mod bench;
pub mod bench_http;
pub mod compress;
pub mod data;
pub mod eval;
pub mod generate;
pub mod index;
pub mod model;
pub mod ppl;

use anyhow::Result;

pub use compress::CompressCommand;

use crate::cli::Command;
use crate::config::Resolved;
use bench::BenchCommand;
use data::DataCommand;
use index::IndexCommand;

/// Runs a parsed command.
pub fn run(command: Command, config: &Resolved) -> Result<()> {
    match command {
        Command::Tui => crate::app::run(config),
        Command::Model(cmd) => model::run(cmd, config),
        Command::Ask(args) => ask::run(args, config),
        Command::Generate(args) => generate::run(args, config),
        Command::Bench(BenchCommand::Backend(args)) => bench::backend(args, config),
        Command::Bench(BenchCommand::Agent(args)) => bench::agent(args, config),
        Command::Bench(BenchCommand::Http(args)) => bench_http::run(args),
        Command::Index(IndexCommand::Build {
            corpora,
            vital_only,
            out,
            dense,
        }) => index::build(corpora, vital_only, out, dense, config),
        Command::Index(IndexCommand::Embed) => index::embed(config),
        Command::Search(args) => index::search(args, config),
        Command::Eval(cmd) => eval::run(cmd, config),
        Command::Ppl(args) => ppl::run(args, config),
        Command::Data(DataCommand::Trajectories(args)) => data::trajectories(args, config),
        Command::Compress(cmd) => compress::run(*cmd, config),
        Command::Serve(args) => crate::serve::run(args, config),
    }
}
