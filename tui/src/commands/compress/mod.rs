//! `geek compress …`: parse → call `geek_compress::pipeline` → print. The bars are drawn here
//! from the library's events.

mod args;
mod prune;
mod wid;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use geek_backend::Engine;
use geek_compress::distill::{LearnEvent, LearnSummary};
use geek_compress::export::{
    load_adapter, save_adapter, write_gguf_lora, write_merged_gguf, write_peft, FloatType,
};
use geek_compress::pipeline::{self, PipelineEvent, PipelineJob, PruneMethod, QuantMethod};
use geek_compress::quantize::{QuantReport, QuantType};
use geek_compress::train::{TrainEvent, TrainSummary};
use geek_compress::{AdaptedModel, BaseWeights};
use indicatif::ProgressBar;

pub use args::{
    CompressCommand, ExportArgs, FinetuneArgs, LearnedArgs, PipelineArgs, QuantizeArgs,
};
pub use prune::PruneArgs;
pub use wid::WidArgs;

use crate::config::Resolved;

/// Runs a `geek compress` command.
pub fn run(cmd: CompressCommand, config: &Resolved) -> Result<()> {
    match cmd {
        CompressCommand::Finetune(args) => finetune(args, config),
        CompressCommand::Export(args) => export(args, config),
        CompressCommand::Quantize(args) => quantize(args, config),
        CompressCommand::Pipeline(args) => run_pipeline(args, config),
        CompressCommand::Prune(args) => prune::run(args, config),
        CompressCommand::Wid(args) => wid::run(args, config),
        CompressCommand::Dequantize { out, r#type } => dequantize(&out, r#type, config),
    }
}

/// The backend's tokenizer for the model being compressed.
fn tokenizer(config: &Resolved, model: &Path) -> Result<Engine> {
    let mut engine_config = config.engine_config()?.with_n_ctx(512);
    engine_config.model = model.to_path_buf();
    Ok(Engine::load(engine_config)?)
}

fn finetune(args: FinetuneArgs, config: &Resolved) -> Result<()> {
    let base_path = config.model_path(args.base.as_deref())?;
    let job = args.job();
    let bar = crate::progress::steps_bar(job.train.steps as u64);
    let started = Instant::now();
    let mut on_event = |e: PipelineEvent<'_>| show(&bar, e, 0, job.train.seq_len);
    // The tokenizer (a llama.cpp model) is dropped before the f32 weights are loaded.
    let data = pipeline::finetune_data(&job, &tokenizer(config, &base_path)?, &mut on_event);
    let result =
        data.and_then(|data| pipeline::finetune_tokenized(&base_path, &job, &data, &mut on_event));
    bar.finish_and_clear();
    let (base, model, summary) = result?;
    save_finetune(&job.out, &args.data, &base, &model, &summary, started)
}

/// Moves the bar (offset by `offset` steps) for one event.
fn show(bar: &ProgressBar, event: PipelineEvent, offset: u64, seq_len: usize) {
    match event {
        PipelineEvent::Stage(stage) => bar.set_message(stage),
        PipelineEvent::Finetune(e) => show_train(bar, e, offset, seq_len),
        PipelineEvent::Quantize(e) => show_learn(bar, e, offset),
        PipelineEvent::Prune(_) => {}
    }
}

/// "; resuming at step N" for a run that continues a checkpoint.
fn resuming_note(start_step: usize) -> String {
    if start_step > 0 {
        format!("; resuming at step {start_step}")
    } else {
        String::new()
    }
}

fn show_train(bar: &ProgressBar, e: &TrainEvent, offset: u64, seq_len: usize) {
    match e {
        TrainEvent::Started {
            trainable,
            rows,
            cut,
            start_step,
        } => {
            let resume = resuming_note(*start_step);
            crate::progress::note(bar, format!(
                "{trainable} trainable weights; {rows} rows of {seq_len} tokens per epoch ({cut} examples cut to fit){resume}"
            ));
            bar.set_position(offset + *start_step as u64);
        }
        TrainEvent::Step {
            step,
            loss,
            lr,
            tokens_per_sec,
        } => {
            bar.set_position(offset + *step as u64);
            bar.set_message(format!(
                "finetune: loss {loss:.4} lr {lr:.1e} {tokens_per_sec:.0} tok/s"
            ));
            tracing::info!(step, loss, lr, tokens_per_sec, "step");
            if bar.is_hidden() && (*step == 1 || step % 10 == 0) {
                eprintln!("step {step}: loss {loss:.4}, lr {lr:.2e}, {tokens_per_sec:.0} tokens/s");
            }
        }
        TrainEvent::Heldout { step, loss } => {
            crate::progress::note(bar, format!("step {step}: held-out loss {loss:.4}"))
        }
        TrainEvent::Checkpoint { step } => tracing::info!(step, "checkpoint"),
    }
}

fn show_learn(bar: &ProgressBar, e: &LearnEvent, offset: u64) {
    match e {
        LearnEvent::Started {
            learnable,
            rows,
            heldout_kl,
            start_step,
        } => {
            let resume = resuming_note(*start_step);
            crate::progress::note(bar, format!(
                "{learnable} learnable numbers; {rows} calibration rows; held-out KL {heldout_kl:.4}{resume}"
            ));
            bar.set_position(offset + *start_step as u64);
        }
        LearnEvent::Measuring { rows } => {
            bar.set_message(format!("importance of the inputs: {rows} rows"));
            tracing::info!(rows, "importance measured");
        }
        LearnEvent::Heldout { step, kl } => {
            crate::progress::note(bar, format!("step {step}: held-out KL {kl:.4}"));
        }
        LearnEvent::Step {
            step,
            kl,
            contrastive,
            tokens_per_sec,
        } => {
            bar.set_position(offset + *step as u64);
            bar.set_message(format!(
                "quantize: KL {kl:.4} contrastive {contrastive:.3} {tokens_per_sec:.0} tok/s"
            ));
            tracing::info!(step, kl, contrastive, tokens_per_sec, "step");
            if bar.is_hidden() && (*step == 1 || step % 10 == 0) {
                eprintln!("step {step}: KL {kl:.4}, contrastive {contrastive:.3}, {tokens_per_sec:.0} tokens/s");
            }
        }
    }
}

/// Saves the adapter, loss curve and summary of a finetune in `out` and prints what it did.
fn save_finetune(
    out: &Path,
    data: &Path,
    base: &BaseWeights,
    model: &AdaptedModel,
    summary: &TrainSummary,
    started: Instant,
) -> Result<()> {
    let adapter = model
        .adapter()
        .context("a finetuned model has an adapter")?;
    let adapter_dir = out.join("adapter");
    save_adapter(model, base, &adapter_dir)?;
    let points: Vec<(usize, f64, Option<f64>)> = summary
        .history
        .iter()
        .map(|p| (p.step, p.loss, p.heldout))
        .collect();
    let title = format!(
        "{} r={} on {}",
        adapter.kind.name(),
        adapter.rank,
        data.display()
    );
    if let Err(e) = geek_evals::report::loss_curve(&out.join("loss.png"), &title, &points) {
        eprintln!("warning: no loss curve: {e}");
    }
    let summary_path = out.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_vec_pretty(summary)?)
        .with_context(|| format!("write {}", summary_path.display()))?;
    println!(
        "{}: {} trainable weights, {} steps; held-out loss {} -> {:.4}; {:.1} tokens/s, peak RSS {:.2} GB, {:.0} s",
        adapter.kind.name(),
        summary.trainable,
        summary.steps,
        summary
            .initial_heldout_loss
            .map_or("?".into(), |l| format!("{l:.4}")),
        summary.heldout_loss,
        summary.tokens_per_sec,
        summary.peak_rss_bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    if summary.stream_cache_bytes > 0 {
        println!(
            "lower layers' streams kept: {:.2} GB",
            summary.stream_cache_bytes as f64 / 1e9
        );
    }
    println!("adapter: {}", adapter_dir.display());
    Ok(())
}

fn dequantize(out: &Path, ty: FloatType, config: &Resolved) -> Result<()> {
    let path = config.model_path(None)?;
    let base = BaseWeights::load(&path)?;
    let model = AdaptedModel::new(&base, None)?;
    write_merged_gguf(&model, &base, out, ty)?;
    println!("{} dequantized to {}", path.display(), out.display());
    Ok(())
}

fn quantize(args: QuantizeArgs, config: &Resolved) -> Result<()> {
    let path = config.model_path(args.input.as_deref())?;
    let started = Instant::now();
    let base = BaseWeights::load(&path)?;
    let job = args
        .learned
        .job(args.r#type, args.method, args.out.clone(), &config.data_dir);
    let steps = if args.method == QuantMethod::Learned {
        job.learned.steps
    } else {
        0
    };
    let bar = crate::progress::steps_bar(steps as u64);
    let engine = tokenizer(config, &path)?;
    let result = pipeline::quantize(&base, &job, &engine, &mut |e| {
        show(&bar, e, 0, job.calibration.seq_len)
    });
    bar.finish_and_clear();
    let (report, summary) = result?;
    let done = Quantized {
        input: &path,
        out: &args.out,
        ty: args.r#type,
        method: args.method,
        base: &base,
        report: &report,
        summary: summary.as_ref(),
    };
    done.print(&args.learned, started)
}

/// A quantization's outcome, for printing.
struct Quantized<'a> {
    input: &'a Path,
    out: &'a Path,
    ty: QuantType,
    method: QuantMethod,
    base: &'a BaseWeights,
    report: &'a QuantReport,
    summary: Option<&'a LearnSummary>,
}

impl Quantized<'_> {
    fn print(&self, args: &LearnedArgs, started: Instant) -> Result<()> {
        let types: Vec<String> = self
            .report
            .tensors_by_type
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        println!(
            "{} -> {} ({}, {}): {} tensors ({}; {} fell back), {:.2} bits/weight, {:.1} MB, {:.1} s",
            self.input.display(),
            self.out.display(),
            self.ty.name(),
            self.method,
            self.base.names().len(),
            types.join(", "),
            self.report.fallbacks,
            self.report.bits_per_weight,
            std::fs::metadata(self.out).map_or(0, |m| m.len()) as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        let Some(summary) = self.summary else {
            return Ok(());
        };
        println!(
            "held-out KL(teacher ‖ student) per token: rtn {:.4}, initial scales {:.4}, learned {:.4} (step {})",
            summary.rtn_kl, summary.initial_kl, summary.final_kl, summary.best_step
        );
        if let Some(file) = &args.summary {
            let json = serde_json::json!({ "learn": summary, "report": self.report });
            std::fs::write(file, serde_json::to_vec_pretty(&json)?)
                .with_context(|| format!("write {}", file.display()))?;
        }
        Ok(())
    }
}

/// [finetune → merge] → [prune] → quantize, with one progress bar over the trainings.
fn run_pipeline(args: PipelineArgs, config: &Resolved) -> Result<()> {
    let base_path = config.model_path(args.base.as_deref())?;
    let quantize = args
        .learned
        .job(args.r#type, args.method, args.out.clone(), &config.data_dir);
    let job = PipelineJob {
        finetune: args.finetune_job(),
        prune: args.prune_job(&quantize.calibration),
        quantize,
        keep_base: args.keep_base,
    };
    let quant_steps = match args.method {
        QuantMethod::Learned => args.learned.steps,
        QuantMethod::Rtn => 0,
    };
    let finetune_steps = job.finetune.as_ref().map_or(0, |f| f.train.steps);
    let prune_steps = job.prune.as_ref().map_or(0, |p| {
        let masks = if p.method == PruneMethod::Learned {
            p.masks.steps
        } else {
            0
        };
        masks + p.recover.steps
    });
    let bar = crate::progress::steps_bar((finetune_steps + prune_steps + quant_steps) as u64);
    let started = Instant::now();
    let engine = tokenizer(config, &base_path)?;
    let seq_len = job.finetune.as_ref().map_or(0, |f| f.train.seq_len);
    let mut prune_offset = 0;
    let result = pipeline::pipeline(
        &base_path,
        &job,
        &engine,
        &mut |base, model, summary| {
            let (Some(finetune), Some(data)) = (&job.finetune, &args.data) else {
                return Ok(());
            };
            let saved =
                bar.suspend(|| save_finetune(&finetune.out, data, base, model, summary, started));
            saved.map_err(|e| geek_compress::Error::Config(format!("{e:#}")))
        },
        // Pruning's steps follow the finetune's; the quantization's follow both.
        &mut |e| match (e, &job.prune) {
            (PipelineEvent::Prune(e), Some(p)) => {
                prune::show(&bar, e, finetune_steps as u64, &mut prune_offset, p)
            }
            (e @ PipelineEvent::Quantize(_), _) => {
                show(&bar, e, (finetune_steps + prune_steps) as u64, seq_len)
            }
            (e, _) => show(&bar, e, 0, seq_len),
        },
    );
    bar.finish_and_clear();
    let outcome = result?;
    let input = match (&outcome.pruned, &job.finetune) {
        (Some(size), _) => size.path.clone(),
        (None, Some(f)) => f.out.join("adapter"),
        (None, None) => base_path.clone(),
    };
    let done = Quantized {
        input: &input,
        out: &args.out,
        ty: args.r#type,
        method: args.method,
        base: &outcome.quantized,
        report: &outcome.report,
        summary: outcome.learn.as_ref(),
    };
    done.print(&args.learned, started)?;
    println!("serve it: geek ask --model {} \"…\"", args.out.display());
    Ok(())
}

fn export(args: ExportArgs, config: &Resolved) -> Result<()> {
    if args.merged.is_none() && args.gguf_lora.is_none() && args.peft.is_none() {
        bail!("nothing to write: give --merged, --gguf-lora and/or --peft");
    }
    let base = BaseWeights::load(config.model_path(args.base.as_deref())?)?;
    let model = load_adapter(&base, &args.adapter_dir)?;
    if let Some(path) = &args.merged {
        write_merged_gguf(&model, &base, path, args.r#type)?;
        println!("merged model: {}", path.display());
    }
    if let Some(path) = &args.gguf_lora {
        write_gguf_lora(&model, &base, path)?;
        println!("GGUF LoRA adapter: {}", path.display());
    }
    if let Some(dir) = &args.peft {
        write_peft(&model, &base, dir)?;
        println!("PEFT adapter: {}", dir.display());
    }
    Ok(())
}
