//! One module per subcommand.

mod bench;
mod generate;
mod model;

use anyhow::Result;

use crate::cli::{BenchCommand, Command};
use crate::config::Resolved;

/// Runs a parsed command.
pub fn run(command: Command, config: &Resolved) -> Result<()> {
    match command {
        Command::Model(cmd) => model::run(cmd, config),
        Command::Generate(args) => generate::run(args, config),
        Command::Bench(BenchCommand::Backend(args)) => bench::backend(args, config),
    }
}
