//! `geek compress finetune` and `geek compress export`.

use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use geek_backend::Engine;
use geek_compress::data::{read_jsonl, tokenize};
use geek_compress::export::{
    load_adapter, save_adapter, write_gguf_lora, write_merged_gguf, write_peft, FloatType,
};
use geek_compress::train::{finetune as train, TrainConfig, TrainEvent};
use geek_compress::{AdapterConfig, AdapterKind, BaseWeights, MixerInit, Target};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{ExportArgs, FinetuneArgs};
use crate::config::Resolved;

pub fn finetune(args: FinetuneArgs, config: &Resolved) -> Result<()> {
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
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(args.steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    let started = Instant::now();
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
                bar.set_position(*start_step as u64);
            }
            TrainEvent::Step {
                step,
                loss,
                lr,
                tokens_per_sec,
            } => {
                bar.set_position(*step as u64);
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.1e} {tokens_per_sec:.0} tok/s"
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
    bar.finish_and_clear();
    let adapter_dir = args.out.join("adapter");
    save_adapter(&model, &base, &adapter_dir)?;
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
    std::fs::write(&summary_path, serde_json::to_vec_pretty(&summary)?)
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

pub fn quantize(
    input: Option<&str>,
    out: &std::path::Path,
    ty: &str,
    config: &Resolved,
) -> Result<()> {
    let ty = geek_compress::quantize::QuantType::from_name(ty)?;
    let path = config.model_path(input)?;
    let started = Instant::now();
    let base = BaseWeights::load(&path)?;
    let report = geek_compress::quantize::quantize_rtn(&base, ty, out)?;
    let types: Vec<String> = report
        .tensors_by_type
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "{} -> {} ({}, rtn): {} tensors ({}; {} fell back), {:.2} bits/weight, {:.1} MB, {:.1} s",
        path.display(),
        out.display(),
        ty.name(),
        base.names().len(),
        types.join(", "),
        report.fallbacks,
        report.bits_per_weight,
        std::fs::metadata(out).map_or(0, |m| m.len()) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
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
