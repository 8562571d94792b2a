//! `geek generate`: one prompt, streamed to stdout.

use std::path::PathBuf;

use clap::Args;

use std::io::Write;

use anyhow::{Context, Result};
use geek_backend::{ChatMessage, GenEvent, GenerateParams, Sampling};

use crate::config::Resolved;

pub fn run(args: GenerateArgs, config: &Resolved) -> Result<()> {
    let engine = config.load(config.engine_config()?)?;
    let prompt = if args.raw || engine.info().chat_template.is_none() {
        args.prompt.clone()
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        engine.chat_prompt(&messages, true).wait()?
    };
    let grammar = match &args.grammar {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading grammar {}", path.display()))?,
        ),
        None => None,
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repeat_penalty: args.repeat_penalty,
            seed: args.seed,
            ..Sampling::default()
        },
        stop: args.stop.clone(),
        grammar,
        ignore_eos: false,
        logprobs: 0,
    };
    let seq = engine.sequence()?;
    seq.append(prompt).wait()?;
    let mut stream = seq.generate(params);
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = stream.next_blocking() {
        match event {
            GenEvent::Piece(text) if !args.json => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            GenEvent::Piece(_) => {}
            GenEvent::Done(done) => {
                if args.json {
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&done)?)?;
                } else {
                    writeln!(stdout)?;
                    let tps = done.tokens.len() as f64 / done.generation_seconds.max(1e-9);
                    tracing::info!(stop = ?done.stop, tokens = done.tokens.len(), tokens_per_second = tps, "done");
                }
                return Ok(());
            }
            GenEvent::Failed(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the engine stopped before the generation ended")
}

/// `geek generate`
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Send the prompt as is instead of wrapping it in the model's chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message (chat mode).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k.
    #[arg(long, default_value_t = 40)]
    pub top_k: i32,
    /// Top-p.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Repeat penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// A GBNF grammar file the output must follow.
    #[arg(long)]
    pub grammar: Option<PathBuf>,
    /// Print the completion as JSON instead of streaming text.
    #[arg(long)]
    pub json: bool,
}
