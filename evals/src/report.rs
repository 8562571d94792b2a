//! `geek eval report`: a Markdown table comparing runs, and PNG plots (accuracy per method
//! with error bars, steps per question, accuracy against steps).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::Metrics;
use crate::run::Results;
use crate::samples::{read_samples, Sample};
use crate::{Error, Result};

/// One run found on disk.
#[derive(Debug, Clone)]
pub struct RunOnDisk {
    /// The results file.
    pub path: PathBuf,
    /// Its content.
    pub results: Results,
    /// Its samples.
    pub samples: Vec<Sample>,
}

/// Every `results_*.json` in `dirs`, with its samples, sorted by method then file name.
pub fn find_runs(dirs: &[PathBuf]) -> Result<Vec<RunOnDisk>> {
    let mut runs = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !(name.starts_with("results_") && name.ends_with(".json")) {
                continue;
            }
            let results = read_results(&path)?;
            let samples = read_samples(&samples_beside(&path, &results)?)?;
            if !samples.damaged.is_empty() {
                tracing::warn!(results = %path.display(), lines = samples.damaged.len(), "damaged sample lines skipped");
            }
            let samples = samples.samples;
            runs.push(RunOnDisk {
                path,
                results,
                samples,
            });
        }
    }
    runs.sort_by(|a, b| {
        (a.results.config.method.name(), &a.path).cmp(&(b.results.config.method.name(), &b.path))
    });
    Ok(runs)
}

/// Reads a results file, refusing one without StrategyQA metrics.
fn read_results(path: &Path) -> Result<Results> {
    let bad = |reason: String| Error::Dataset {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let results: Results =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a results file: {e}")))?;
    if !results.results.contains_key(METRICS_KEY) {
        return Err(bad(format!("no \"{METRICS_KEY}\" metrics in it")));
    }
    Ok(results)
}

/// The samples file of a results file: the file it names, in the results file's own
/// directory (a results file can never make a report read, or touch, a file elsewhere).
fn samples_beside(results_path: &Path, results: &Results) -> Result<PathBuf> {
    let name = results
        .samples_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !(name.starts_with("samples_") && name.ends_with(".jsonl")) {
        return Err(Error::Dataset {
            path: results_path.to_path_buf(),
            reason: format!(
                "its samples_file {:?} is not a samples_*.jsonl name",
                results.samples_file
            ),
        });
    }
    Ok(results_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(name))
}

/// The key of the StrategyQA metrics in a results file.
const METRICS_KEY: &str = "strategyqa";

fn run_metrics(r: &RunOnDisk) -> &Metrics {
    &r.results.results[METRICS_KEY]
}

/// The Markdown comparison table.
pub fn markdown(runs: &[RunOnDisk]) -> String {
    let mut s = String::from(
        "| method | split | n | accuracy | ± stderr | calibrated (offset) | yes answers | AUC | Recall@10 | steps/question | questions/min | tokens decoded | without KV reuse | model |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in runs {
        let m = run_metrics(r);
        let f = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |x| format!("{x:.d$}"));
        let model = r
            .results
            .config
            .model
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let calibrated = m.calibrated.first().map_or("–".to_string(), |c| {
            format!(
                "{} ± {} ({:+.2}, {})",
                f(c.acc, 4),
                f(c.acc_stderr, 4),
                c.offset,
                c.source
            )
        });
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
            r.results.config.method.name(),
            r.results.config.split,
            m.n,
            f(m.acc, 4),
            f(m.acc_stderr, 4),
            calibrated,
            m.yes_answers,
            f(m.auc, 3),
            f(m.recall_at_10, 3),
            f(m.mean_steps, 2),
            r.results.questions_per_minute,
            m.tokens_decoded,
            m.tokens_without_reuse,
            model
        ));
    }
    s
}

/// Writes `report.md` and the PNG plots into `out`; returns the files written.
pub fn write_report(runs: &[RunOnDisk], out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let md_path = out.join("report.md");
    let mut md = String::from("# StrategyQA runs\n\n");
    md.push_str(&markdown(runs));
    md.push_str("\n![accuracy](accuracy.png)\n![steps](steps_histogram.png)\n![accuracy vs steps](accuracy_vs_steps.png)\n");
    std::fs::write(&md_path, md).map_err(|source| Error::Io {
        path: md_path.clone(),
        source,
    })?;
    let mut written = vec![md_path];
    register_font(out)?;
    written.push(accuracy_plot(runs, &out.join("accuracy.png"))?);
    let steps: Vec<&Sample> = runs
        .iter()
        .flat_map(|r| &r.samples)
        .filter(|s| s.steps.is_some())
        .collect();
    written.push(steps_histogram(&steps, &out.join("steps_histogram.png"))?);
    written.push(accuracy_vs_steps(
        &steps,
        &out.join("accuracy_vs_steps.png"),
    )?);
    Ok(written)
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Plots need a TTF font for their labels: the first of the usual system fonts.
fn register_font(out: &Path) -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).ok().is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Plot {
            path: out.to_path_buf(),
            reason: "no TTF font found for labels (install fonts-dejavu-core)".into(),
        })
    }
}

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Plot {
        path: path.to_path_buf(),
        reason,
    }
}

fn accuracy_plot(runs: &[RunOnDisk], path: &Path) -> Result<PathBuf> {
    let err = plot_err(path);
    let points: Vec<(String, f64, f64)> = runs
        .iter()
        .filter_map(|r| {
            let m = run_metrics(r);
            Some((
                format!(
                    "{} ({})",
                    r.results.config.method.name(),
                    r.results.config.split
                ),
                m.acc?,
                m.acc_stderr?,
            ))
        })
        .collect();
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let n = points.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "StrategyQA accuracy (± 1 standard error)",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0.0f64..1.0)
        .map_err(|e| err(e.to_string()))?;
    let labels: Vec<String> = points.iter().map(|p| p.0.clone()).collect();
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 1e-6 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("accuracy")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(points.iter().enumerate().map(|(i, (_, acc, se))| {
            ErrorBar::new_vertical(i as f64, acc - se, *acc, acc + se, BLUE.filled(), 12)
        }))
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(
            points
                .iter()
                .enumerate()
                .map(|(i, (_, acc, _))| Circle::new((i as f64, *acc), 5, BLUE.filled())),
        )
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            [(-0.5, 0.5), (n as f64 - 0.5, 0.5)],
            BLACK.mix(0.3),
        ))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(path.to_path_buf())
}

fn steps_histogram(samples: &[&Sample], path: &Path) -> Result<PathBuf> {
    let err = plot_err(path);
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for s in samples {
        *counts.entry(s.steps.unwrap_or(0)).or_insert(0) += 1;
    }
    let max_steps = counts.keys().max().copied().unwrap_or(1);
    let max_count = counts.values().max().copied().unwrap_or(1);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Sub-questions per question (geek)", ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0..max_steps + 1).into_segmented(), 0..max_count + 1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("sub-questions")
        .y_desc("questions")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(BLUE.filled())
                .data(counts.iter().map(|(k, v)| (*k, *v))),
        )
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(path.to_path_buf())
}

fn accuracy_vs_steps(samples: &[&Sample], path: &Path) -> Result<PathBuf> {
    let err = plot_err(path);
    let mut by_steps: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for s in samples {
        if let Some(c) = s.correct {
            let e = by_steps.entry(s.steps.unwrap_or(0)).or_insert((0, 0));
            e.0 += usize::from(c);
            e.1 += 1;
        }
    }
    let max_steps = by_steps.keys().max().copied().unwrap_or(1) as f64;
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Accuracy by number of sub-questions (geek; point size ~ questions)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..max_steps + 0.5, 0.0f64..1.0)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("sub-questions")
        .y_desc("accuracy")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(by_steps.iter().map(|(k, (c, n))| {
            let radius = (3.0 + (*n as f64).sqrt() * 2.0) as i32;
            Circle::new(
                (*k as f64, *c as f64 / *n as f64),
                radius,
                RED.mix(0.6).filled(),
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(path.to_path_buf())
}

/// A training loss curve: the training loss per step and, where measured, the held-out loss.
/// `points` are (step, training loss, held-out loss).
pub fn loss_curve(path: &Path, title: &str, points: &[(usize, f64, Option<f64>)]) -> Result<()> {
    register_font(path)?;
    let err = plot_err(path);
    let max_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let losses = points
        .iter()
        .flat_map(|p| [Some(p.1), p.2])
        .flatten()
        .filter(|x| x.is_finite());
    let max_loss = losses.fold(0.0f64, f64::max).max(0.1) * 1.05;
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_step, 0.0..max_loss)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("token cross-entropy")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0 as f64, p.1)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("training")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let heldout: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.2.map(|h| (p.0 as f64, h)))
        .collect();
    chart
        .draw_series(LineSeries::new(heldout.clone(), RED.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("held-out")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(heldout.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
