//! `geek ppl`.

use std::path::PathBuf;

use clap::Args;

use std::io::IsTerminal;

use anyhow::{Context, Result};
use geek_backend::perplexity::perplexity;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Resolved;

pub fn run(args: PplArgs, config: &Resolved) -> Result<()> {
    let path = match args.text {
        Some(p) => p,
        None => config.require_data_dir()?.join("wikitext2/wiki.test.raw"),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let model = config.model_path(None)?;
    let mut engine_config = config.engine_config()?.with_n_ctx(args.ctx as u32);
    engine_config.n_batch = engine_config.n_batch.min(args.ctx as u32);
    let engine = config.load(engine_config)?;
    let bar = if std::io::stderr().is_terminal() && !args.json {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} chunks {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    let result = perplexity(&engine, &text, args.ctx, args.chunks, |done, total, ppl| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("ppl {ppl:.4}"));
    })?;
    bar.finish_and_clear();
    if args.json {
        let mut v = serde_json::to_value(&result)?;
        v["model"] = model.display().to_string().into();
        v["text"] = path.display().to_string().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: perplexity {:.4} on {} ({} chunks of {} tokens, {} scored) in {:.1} s",
            model.display(),
            result.ppl,
            path.display(),
            result.chunks,
            result.n_ctx,
            result.scored,
            result.seconds
        );
    }
    Ok(())
}

/// `geek ppl`
#[derive(Debug, Args)]
pub struct PplArgs {
    /// Text file (default: WikiText-2 test, `wikitext2/wiki.test.raw` in the data directory;
    /// CRLF is read as LF).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// At most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
