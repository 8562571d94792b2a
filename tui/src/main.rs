//! The `geek` binary: a thin layer over the library crates.

mod app;
mod cli;
mod commands;
mod config;
mod passages;
mod progress;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let command = cli.command.unwrap_or(cli::Command::Tui);
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,llama-cpp-2=error,llama_cpp_2=error")
        })
    };
    if matches!(command, cli::Command::Tui) {
        // The terminal belongs to the UI: logs go to a file.
        let log = geek_backend::paths::log_file();
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
        {
            Ok(file) => tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init(),
            Err(_) => tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::sink)
                .init(),
        }
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init();
    }
    let config = config::Resolved::from_args(&cli.global);
    match commands::run(command, &config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
