//! `geek compress finetune` and `geek compress export`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use geek_backend::Engine;
use geek_compress::data::{read_jsonl, tokenize};
use geek_compress::export::{
    load_adapter, merge, save_adapter, write_gguf_lora, write_merged_gguf, write_peft, FloatType,
};
use geek_compress::train::{finetune as train, TrainConfig, TrainEvent, TrainSummary};
use geek_compress::{AdaptedModel, AdapterConfig, AdapterKind, BaseWeights, MixerInit, Target};
use indicatif::{ProgressBar, ProgressStyle};

use geek_compress::blocks::{Granularity, ScaleInit};
use geek_compress::distill::{
    calibration_rows, learn, LearnEvent, LearnSummary, LearnedConfig, LearnedModel,
};
use geek_compress::quantize::{quantize_rtn, Mix, QuantReport, QuantType};
use geek_retriever::CorpusSource;

use crate::cli::{ExportArgs, FinetuneArgs, LearnedArgs, PipelineArgs, QuantizeArgs};
use crate::config::Resolved;

pub fn finetune(args: FinetuneArgs, config: &Resolved) -> Result<()> {
    let bar = steps_bar(args.steps as u64);
    let started = Instant::now();
    let (base, model, summary) = finetune_with(&args, config, &bar, 0)?;
    bar.finish_and_clear();
    report_finetune(&args, &base, &model, &summary, started)
}

/// A progress bar over optimizer steps (hidden when stderr is not a terminal).
fn steps_bar(len: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar
}

/// Trains the adapter of `args`, moving `bar` from `offset`.
fn finetune_with(
    args: &FinetuneArgs,
    config: &Resolved,
    bar: &ProgressBar,
    offset: u64,
) -> Result<(BaseWeights, AdaptedModel, TrainSummary)> {
    let base_path = config.model_path(args.base.as_deref())?;
    let adapter = AdapterConfig {
        kind: AdapterKind::from_name(&args.adapter)?,
        rank: args.rank,
        alpha: args.alpha,
        targets: args
            .targets
            .iter()
            .map(|t| Target::from_name(t))
            .collect::<Result<_, _>>()?,
        tt_rank: args.tt_rank,
        mixer_init: match args.mixer_init.as_str() {
            "kaiming" => MixerInit::Kaiming,
            "orthogonal" => MixerInit::Orthogonal,
            other => bail!("unknown mixer init `{other}` (kaiming or orthogonal)"),
        },
        seed: args.seed,
    };
    adapter.validate()?;
    let train_config = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        accumulation: args.accumulation,
        seq_len: args.seq_len,
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        clip: args.clip,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        holdout: args.holdout,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let mut examples = read_jsonl(&args.data)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    // The backend's tokenizer, so training sees the tokens serving will.
    let engine = Engine::load(config.engine_config()?.with_n_ctx(512))?;
    let data = tokenize(&engine, &examples)?;
    drop(engine);
    let base = BaseWeights::load(&base_path)?;
    eprintln!(
        "{}: {} examples ({} held out), {} adapter",
        base_path.display(),
        data.len(),
        args.holdout,
        adapter.kind.name()
    );
    let (model, summary) = train(
        &base,
        &adapter,
        &data,
        &train_config,
        &args.out,
        &mut |e| match e {
            TrainEvent::Started {
                trainable,
                rows,
                cut,
                start_step,
            } => {
                bar.println(format!(
                    "{trainable} trainable weights; {rows} rows of {} tokens per epoch ({cut} examples cut to fit){}",
                    args.seq_len,
                    if *start_step > 0 {
                        format!("; resuming at step {start_step}")
                    } else {
                        String::new()
                    }
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
                if !bar.is_hidden() {
                    return;
                }
                if *step == 1 || step % 10 == 0 {
                    eprintln!(
                        "step {step}: loss {loss:.4}, lr {lr:.2e}, {tokens_per_sec:.0} tokens/s"
                    );
                }
            }
            TrainEvent::Heldout { step, loss } => {
                bar.println(format!("step {step}: held-out loss {loss:.4}"))
            }
            TrainEvent::Checkpoint { step } => tracing::info!(step, "checkpoint"),
        },
    )?;
    Ok((base, model, summary))
}

/// Saves the adapter, loss curve and summary of a finetune and prints what it did.
fn report_finetune(
    args: &FinetuneArgs,
    base: &BaseWeights,
    model: &AdaptedModel,
    summary: &TrainSummary,
    started: Instant,
) -> Result<()> {
    let adapter = model
        .adapter()
        .context("a finetuned model has an adapter")?;
    let adapter_dir = args.out.join("adapter");
    save_adapter(model, base, &adapter_dir)?;
    let points: Vec<(usize, f64, Option<f64>)> = summary
        .history
        .iter()
        .map(|p| (p.step, p.loss, p.heldout))
        .collect();
    let png = args.out.join("loss.png");
    if let Err(e) = geek_evals::report::loss_curve(
        &png,
        &format!(
            "{} r={} on {}",
            adapter.kind.name(),
            adapter.rank,
            args.data.display()
        ),
        &points,
    ) {
        eprintln!("warning: no loss curve: {e}");
    }
    let summary_path = args.out.join("summary.json");
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
    println!("adapter: {}", adapter_dir.display());
    Ok(())
}

fn float_type(name: &str) -> Result<FloatType> {
    Ok(match name {
        "f16" => FloatType::F16,
        "f32" => FloatType::F32,
        other => bail!("unknown type `{other}` (f16 or f32)"),
    })
}

pub fn dequantize(out: &std::path::Path, ty: &str, config: &Resolved) -> Result<()> {
    let ty = float_type(ty)?;
    let path = config.model_path(None)?;
    let base = BaseWeights::load(&path)?;
    let model = geek_compress::AdaptedModel::new(&base, None)?;
    write_merged_gguf(&model, &base, out, ty)?;
    println!("{} dequantized to {}", path.display(), out.display());
    Ok(())
}

pub fn quantize(args: QuantizeArgs, config: &Resolved) -> Result<()> {
    let ty = QuantType::from_name(&args.r#type)?;
    let path = config.model_path(args.input.as_deref())?;
    let started = Instant::now();
    let base = BaseWeights::load(&path)?;
    let learned = args.method == "learned";
    let bar = steps_bar(if learned {
        args.learned.steps as u64
    } else {
        0
    });
    let result = quantize_weights(
        &base,
        ty,
        learned,
        &args.learned,
        &args.out,
        config,
        &bar,
        0,
    );
    bar.finish_and_clear();
    let (report, summary) = result?;
    report_quantize(
        &path,
        &args.out,
        ty,
        &args.method,
        &base,
        &report,
        summary.as_ref(),
        &args.learned,
        started,
    )
}

/// Quantizes `base` into `out` by rtn or learned scales, moving `bar` from `offset`.
#[allow(clippy::too_many_arguments)]
fn quantize_weights(
    base: &BaseWeights,
    ty: QuantType,
    learned: bool,
    args: &LearnedArgs,
    out: &Path,
    config: &Resolved,
    bar: &ProgressBar,
    offset: u64,
) -> Result<(QuantReport, Option<LearnSummary>)> {
    let embedding = args
        .embedding_type
        .as_deref()
        .map(QuantType::from_name)
        .transpose()?;
    if !learned {
        let mix = Mix { ty, embedding };
        return Ok((quantize_rtn(base, mix, out)?, None));
    }
    bar.set_message("quantize: tokenizing calibration text");
    let rows = calibration(args, config)?;
    // Resumable: a rerun of the same command continues from the last checkpoint.
    let checkpoint = out.with_extension("ckpt");
    let (model, summary) = learn_scales(base, &rows, ty, args, &checkpoint, bar, offset)?;
    let report = model.write_gguf(base, out)?;
    let _ = std::fs::remove_dir_all(&checkpoint);
    Ok((report, Some(summary)))
}

#[allow(clippy::too_many_arguments)]
fn report_quantize(
    input: &Path,
    out: &Path,
    ty: QuantType,
    method: &str,
    base: &BaseWeights,
    report: &QuantReport,
    summary: Option<&LearnSummary>,
    args: &LearnedArgs,
    started: Instant,
) -> Result<()> {
    let types: Vec<String> = report
        .tensors_by_type
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "{} -> {} ({}, {method}): {} tensors ({}; {} fell back), {:.2} bits/weight, {:.1} MB, {:.1} s",
        input.display(),
        out.display(),
        ty.name(),
        base.names().len(),
        types.join(", "),
        report.fallbacks,
        report.bits_per_weight,
        std::fs::metadata(out).map_or(0, |m| m.len()) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    if let Some(summary) = summary {
        println!(
            "held-out KL(teacher ‖ student) per token: rtn {:.4}, initial scales {:.4}, learned {:.4} (step {})",
            summary.rtn_kl, summary.initial_kl, summary.final_kl, summary.best_step
        );
        if let Some(file) = &args.summary {
            let json = serde_json::json!({ "learn": summary, "report": report });
            std::fs::write(file, serde_json::to_vec_pretty(&json)?)
                .with_context(|| format!("write {}", file.display()))?;
        }
    }
    Ok(())
}

/// finetune → merge → quantize, with one progress bar over both trainings.
pub fn pipeline(args: PipelineArgs, config: &Resolved) -> Result<()> {
    let ty = QuantType::from_name(&args.r#type)?;
    let learned = args.method == "learned";
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| args.out.with_extension("work"));
    let finetune = FinetuneArgs {
        base: args.base.clone(),
        adapter: args.adapter.clone(),
        data: args.data.clone(),
        out: work.clone(),
        rank: args.rank,
        alpha: 2.0 * args.rank as f64,
        targets: ["q", "k", "v", "o", "gate", "up", "down"]
            .map(String::from)
            .to_vec(),
        tt_rank: 5,
        mixer_init: "kaiming".into(),
        steps: args.finetune_steps,
        batch: 1,
        accumulation: args.accumulation,
        seq_len: args.finetune_seq_len,
        lr: args.finetune_lr,
        warmup: (args.finetune_steps / 10).max(1),
        weight_decay: 0.0,
        clip: 1.0,
        eval_every: 0,
        checkpoint_every: 10,
        holdout: args.holdout,
        limit: args.limit,
        seed: args.learned.seed,
    };
    if AdapterKind::from_name(&args.adapter)? == AdapterKind::LorettaAdp {
        bail!("loretta-adp adds layers the GGUF model has no place for: pick lora, moslora or loretta-rep");
    }
    let quant_steps = if learned { args.learned.steps } else { 0 };
    let bar = steps_bar((args.finetune_steps + quant_steps) as u64);
    let started = Instant::now();
    let result = (|| -> Result<_> {
        let (base, model, summary) = finetune_with(&finetune, config, &bar, 0)?;
        bar.suspend(|| report_finetune(&finetune, &base, &model, &summary, started))?;
        bar.set_message("merging the adapter");
        let merged = merge(&model, &base)?;
        drop(model);
        let quantized = quantize_weights(
            &merged,
            ty,
            learned,
            &args.learned,
            &args.out,
            config,
            &bar,
            args.finetune_steps as u64,
        )?;
        Ok((merged, quantized))
    })();
    bar.finish_and_clear();
    let (merged, (report, summary)) = result?;
    report_quantize(
        &work.join("adapter"),
        &args.out,
        ty,
        &args.method,
        &merged,
        &report,
        summary.as_ref(),
        &args.learned,
        started,
    )?;
    println!("serve it: geek ask --model {} \"…\"", args.out.display());
    Ok(())
}

/// Calibration rows: passages (shuffled by seed) tokenized by the model's own tokenizer.
fn calibration(args: &LearnedArgs, config: &Resolved) -> Result<Vec<Vec<u32>>> {
    let mut texts: Vec<String> = Vec::new();
    let sources = if args.calib.is_empty() {
        CorpusSource::defaults(config.require_data_dir()?)
    } else {
        let mut sources = Vec::new();
        for path in &args.calib {
            if path.extension().is_some_and(|e| e == "txt") {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read {}", path.display()))?;
                texts.extend(text.split("\n\n").map(|p| format!("{p}\n\n")));
            } else {
                sources.push(CorpusSource::from_path(path));
            }
        }
        sources
    };
    for doc in geek_retriever::corpus::load_all(&sources)? {
        texts.push(format!("{}\n{}\n\n", doc.title, doc.text));
    }
    let order = geek_compress::data::shuffled(texts.len(), args.seed);
    let engine = Engine::load(config.engine_config()?.with_n_ctx(512))?;
    let mut documents = Vec::new();
    let (mut tokens, wanted) = (0usize, args.calib_rows * args.seq_len);
    for i in order {
        if tokens >= wanted {
            break;
        }
        let doc: Vec<u32> = engine
            .tokenize(texts[i].clone(), false)
            .wait()?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        tokens += doc.len();
        documents.push(doc);
    }
    let rows = calibration_rows(&documents, args.seq_len, args.calib_rows);
    if rows.len() < args.calib_rows {
        bail!(
            "calibration text holds {} rows of {} tokens, {} asked",
            rows.len(),
            args.seq_len,
            args.calib_rows
        );
    }
    Ok(rows)
}

fn learn_scales(
    base: &BaseWeights,
    rows: &[Vec<u32>],
    ty: QuantType,
    args: &LearnedArgs,
    checkpoint: &Path,
    bar: &ProgressBar,
    offset: u64,
) -> Result<(LearnedModel, LearnSummary)> {
    let learned = LearnedConfig {
        ty,
        embedding: args
            .embedding_type
            .as_deref()
            .map(QuantType::from_name)
            .transpose()?,
        granularity: Granularity::from_name(&args.granularity)?,
        init: if args.init == "rtn" {
            ScaleInit::Rtn
        } else {
            ScaleInit::Mse
        },
        train_weights: args.qat,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        weight_lr: args.weight_lr,
        contrastive_weight: args.contrastive_weight,
        temperature: args.temperature,
        memory_bank: args.memory_bank,
        eval_every: args.eval_every,
        ..LearnedConfig::default()
    };
    let result = learn(base, rows, &learned, Some(checkpoint), &mut |e| match e {
        LearnEvent::Started {
            learnable,
            rows,
            heldout_kl,
            start_step,
        } => {
            bar.println(format!(
                "{learnable} learnable numbers; {rows} calibration rows of {} tokens; held-out KL {heldout_kl:.4}{}",
                args.seq_len,
                if *start_step > 0 {
                    format!("; resuming at step {start_step} from {}", checkpoint.display())
                } else {
                    String::new()
                }
            ));
            bar.set_position(offset + *start_step as u64);
        }
        LearnEvent::Heldout { step, kl } => {
            bar.println(format!("step {step}: held-out KL {kl:.4}"));
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
    });
    Ok(result?)
}

pub fn export(args: ExportArgs, config: &Resolved) -> Result<()> {
    if args.merged.is_none() && args.lora.is_none() && args.peft.is_none() {
        bail!("nothing to write: give --merged, --lora and/or --peft");
    }
    let base = BaseWeights::load(config.model_path(args.base.as_deref())?)?;
    let model = load_adapter(&base, &args.adapter_dir)?;
    if let Some(path) = &args.merged {
        let ty = float_type(&args.r#type)?;
        write_merged_gguf(&model, &base, path, ty)?;
        println!("merged model: {}", path.display());
    }
    if let Some(path) = &args.lora {
        write_gguf_lora(&model, &base, path)?;
        println!("GGUF LoRA adapter: {}", path.display());
    }
    if let Some(dir) = &args.peft {
        write_peft(&model, &base, dir)?;
        println!("PEFT adapter: {}", dir.display());
    }
    Ok(())
}
