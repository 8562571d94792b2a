//! `geek compress wid`: the retriever's sentence encoder compressed by weight-inherited
//! distillation (or the plain-distillation baseline), trained on StrategyQA train evidence.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use geek_compress::wid::{self, Method, TextPair, WidConfig, WidEvent, Widths};
use geek_evals::retrieval::evidence_pairs;
use geek_evals::strategyqa::{self, Split};
use geek_retriever::dense::passage_text;
use indicatif::ProgressBar;

use crate::config::Resolved;

/// `geek compress wid`
#[derive(Debug, Args)]
pub struct WidArgs {
    /// The student's hidden size.
    #[arg(long, default_value_t = 192)]
    pub width: usize,
    /// Attention heads kept per layer (default: all the teacher's); the least important go
    /// whole (fewer heads also mean less attention work per token).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Width of each kept attention head (default: width / heads).
    #[arg(long)]
    pub head_size: Option<usize>,
    /// MLP width (1024: with --width 192, about a third of the teacher's layer parameters).
    #[arg(long, default_value_t = 1024)]
    pub ffn: usize,
    /// wid (compactors on the teacher's weights, contrastive loss) or kd (the teacher
    /// truncated, trained to give its similarities).
    #[arg(long, default_value = "wid")]
    pub method: Method,
    /// The directory written: `config.json`, `model.safetensors`, `tokenizer.json` (load it
    /// with `--encoder DIR`), `wid.json`; a checkpoint while running (a rerun resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Pairs per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Peak learning rate (default: 5e-4 for wid, 1e-4 for kd).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight of the teacher's in-batch ranking as soft labels beside the gold passage (wid;
    /// 0: the gold passage alone).
    #[arg(long, default_value_t = 0.0)]
    pub soft_labels: f64,
    /// The shared hidden compactor's learning rate as a multiple of --lr (wid): it changes
    /// every matrix of every layer at once.
    #[arg(long, default_value_t = 1.0)]
    pub hidden_lr: f64,
    /// Tokens a text is cut to in training.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Pairs held out for the held-out loss.
    #[arg(long, default_value_t = 256)]
    pub holdout: usize,
    /// Evaluate on the held-out pairs every N steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Batch-order seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl WidArgs {
    fn config(&self, teacher: &geek_retriever::dense::BertConfig) -> WidConfig {
        let heads = self.heads.unwrap_or(teacher.num_attention_heads);
        let widths = Widths {
            hidden: self.width,
            heads,
            head: self.head_size.unwrap_or(self.width / heads.max(1)),
            ffn: self.ffn,
        };
        let mut config = WidConfig::new(self.method, widths);
        config.steps = self.steps;
        config.batch = self.batch;
        config.lr = self.lr.unwrap_or(config.lr);
        config.max_tokens = self.max_tokens;
        config.soft_labels = self.soft_labels;
        config.hidden_lr = self.hidden_lr;
        config.holdout = self.holdout;
        config.eval_every = self.eval_every;
        config.seed = self.seed;
        config
    }
}

/// (query, passage) pairs of StrategyQA train's evidence, with the passages' text from the
/// index (as the dense store embeds them).
fn train_pairs(config: &Resolved) -> Result<Vec<TextPair>> {
    let data_dir = config.require_data_dir()?;
    let questions = strategyqa::load(&Split::Train.path(data_dir))?;
    let index = config.open_index()?;
    let mut pairs = Vec::new();
    let mut missing = 0usize;
    // A paragraph is the evidence of several pairs: read each from the index once.
    let mut texts: std::collections::HashMap<String, Option<String>> = Default::default();
    for (query, id) in evidence_pairs(&questions) {
        if !texts.contains_key(&id) {
            let text = index.get(&id)?.map(|p| passage_text(&p.title, &p.text));
            texts.insert(id.clone(), text);
        }
        match &texts[&id] {
            Some(passage) => pairs.push(TextPair {
                query,
                passage: passage.clone(),
                passage_id: id,
            }),
            None => missing += 1,
        }
    }
    if missing > 0 {
        tracing::warn!(missing, "evidence paragraphs not in the index were skipped");
    }
    Ok(pairs)
}

/// Runs `geek compress wid`.
pub fn run(args: WidArgs, config: &Resolved) -> Result<()> {
    let teacher = crate::passages::encoder(&config.encoder, &config.models_dir)?;
    let job = args.config(&teacher.bert().config);
    let pairs = train_pairs(config)?;
    let bar = crate::progress::steps_bar(job.steps as u64);
    let checkpoint = args.out.join("checkpoint");
    let result = wid::compress_encoder(&teacher, &pairs, &job, Some(&checkpoint), &mut |e| {
        show(&bar, e)
    });
    bar.finish_and_clear();
    let (student, summary) = result?;
    wid::save_student(&student, &teacher.dir, &args.out)?;
    let report = args.out.join("wid.json");
    std::fs::write(&report, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", report.display()))?;
    let _ = std::fs::remove_dir_all(&checkpoint);
    print_summary(&summary, &args.out);
    Ok(())
}

fn show(bar: &ProgressBar, e: &WidEvent) {
    match e {
        WidEvent::Started {
            pairs,
            heldout,
            trainable,
            start_step,
        } => {
            crate::progress::note(
                bar,
                format!(
                    "{pairs} training pairs, {heldout} held out; {trainable} trainable weights{}",
                    super::resuming_note(*start_step)
                ),
            );
            bar.set_position(*start_step as u64);
        }
        WidEvent::Step {
            step,
            loss,
            remaining,
            tokens_per_sec,
        } => {
            bar.set_position(*step as u64);
            bar.set_message(format!(
                "loss {loss:.3}, removed dims at {remaining:.2}, {tokens_per_sec:.0} tok/s"
            ));
            tracing::debug!(step, loss, remaining, tokens_per_sec, "wid step");
        }
        WidEvent::Selected(r) => crate::progress::note(
            bar,
            format!(
                "chosen for removal: {} hidden dims, {} per layer of query-key and of value dims, \
                 {} MLP channels per layer",
                r.hidden.len(),
                r.qk.first().map_or(0, Vec::len),
                r.ffn.first().map_or(0, Vec::len)
            ),
        ),
        WidEvent::Heldout { step, score } => crate::progress::note(
            bar,
            format!(
                "step {step}: held-out loss {:.4}, top-1 {:.3}",
                score.loss, score.top1
            ),
        ),
    }
}

fn print_summary(s: &wid::WidSummary, out: &Path) {
    println!(
        "{:?} student: {} -> {} layer parameters ({:.1}%); held-out loss {:.4} (teacher {:.4}), \
         top-1 {:.3} (teacher {:.3}); folding changed embeddings by at most {:.1e}; {:.0} s",
        s.config.method,
        s.teacher_parameters,
        s.student_parameters,
        100.0 * s.student_parameters as f64 / s.teacher_parameters.max(1) as f64,
        s.student_heldout.loss,
        s.teacher_heldout.loss,
        s.student_heldout.top1,
        s.teacher_heldout.top1,
        s.fold_max_error,
        s.seconds
    );
    println!(
        "use it: geek index embed --encoder {0}; geek search --source hybrid --encoder {0} \"…\"",
        out.display()
    );
}
