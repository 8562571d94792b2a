//! Accuracy, its standard error, the ranking quality of the yes/no margin (AUC) and the
//! accuracy after a calibration offset, computed from a run's samples.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::samples::Sample;

/// Metrics of a run, lm-evaluation-harness style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Questions answered.
    pub n: usize,
    /// Correct answers (None for unlabelled splits).
    pub correct: Option<usize>,
    /// Accuracy.
    pub acc: Option<f64>,
    /// Standard error of the accuracy.
    pub acc_stderr: Option<f64>,
    /// "yes" predictions.
    #[serde(default)]
    pub yes_answers: usize,
    /// Area under the ROC curve of `log p(yes) − log p(no)` against the gold answers: how well
    /// the margin ranks answers, whatever the threshold (0.5 = chance).
    #[serde(default)]
    pub auc: Option<f64>,
    /// The same answers with a calibration offset added to every margin, one entry per
    /// offset tried (the first is the one `ask` and the TUI would use).
    #[serde(default)]
    pub calibrated: Vec<CalibratedMetrics>,
    /// Mean Recall@10 of retrieved passages over questions with gold evidence.
    #[serde(rename = "recall@10")]
    pub recall_at_10: Option<f64>,
    /// Mean sub-questions per question (geek).
    pub mean_steps: Option<f64>,
    /// Mean actions per question, by kind (geek).
    pub mean_actions: BTreeMap<String, f64>,
    /// Tokens decoded in all.
    pub tokens_decoded: usize,
    /// Tokens a stateless API would have decoded.
    pub tokens_without_reuse: usize,
    /// Questions that failed.
    pub errors: usize,
}

/// Accuracy after adding `offset` to every margin (`yes` iff margin + offset > 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibratedMetrics {
    /// The offset.
    pub offset: f32,
    /// Where it came from (`fitted on train (N questions)`, `contextual`).
    pub source: String,
    /// Correct answers.
    pub correct: Option<usize>,
    /// Accuracy.
    pub acc: Option<f64>,
    /// Standard error of the accuracy.
    pub acc_stderr: Option<f64>,
    /// "yes" predictions.
    pub yes_answers: usize,
}

/// Accuracy and its standard error over `outcomes` (true = correct).
fn accuracy(outcomes: &[bool]) -> (Option<usize>, Option<f64>, Option<f64>) {
    if outcomes.is_empty() {
        return (None, None, None);
    }
    let correct = outcomes.iter().filter(|&&c| c).count();
    let m = outcomes.len() as f64;
    let p = correct as f64 / m;
    let se = if m > 1.0 {
        (p * (1.0 - p) / (m - 1.0)).sqrt()
    } else {
        0.0
    };
    (Some(correct), Some(p), Some(se))
}

/// The calibrated prediction of a sample: its margin plus `offset`, or the raw prediction
/// when the margin is unknown (a failed question).
pub fn calibrated_prediction(sample: &Sample, offset: f32) -> bool {
    sample
        .margin()
        .map_or(sample.prediction, |m| m + offset > 0.0)
}

/// Computes the metrics of a set of samples; each calibration is (offset, its source).
pub fn metrics(samples: &[Sample], calibrations: &[(f32, &str)]) -> Metrics {
    let n = samples.len();
    let labelled: Vec<&Sample> = samples.iter().filter(|s| s.gold.is_some()).collect();
    let raw: Vec<bool> = labelled.iter().map(|s| s.correct == Some(true)).collect();
    let (correct, acc, acc_stderr) = accuracy(&raw);
    let calibrated = calibrations.iter().map(|&(offset, source)| {
        let outcomes: Vec<bool> = labelled
            .iter()
            .map(|s| s.error.is_none() && Some(calibrated_prediction(s, offset)) == s.gold)
            .collect();
        let (correct, acc, acc_stderr) = accuracy(&outcomes);
        CalibratedMetrics {
            offset,
            source: source.to_string(),
            correct,
            acc,
            acc_stderr,
            yes_answers: samples
                .iter()
                .filter(|s| calibrated_prediction(s, offset))
                .count(),
        }
    });
    let calibrated = calibrated.collect();
    let scored: Vec<(f32, bool)> = labelled
        .iter()
        .filter_map(|s| Some((s.margin()?, s.gold?)))
        .collect();
    let recalls: Vec<f64> = samples.iter().filter_map(|s| s.recall_at_10).collect();
    let steps: Vec<usize> = samples.iter().filter_map(|s| s.steps).collect();
    let mut mean_actions = BTreeMap::new();
    for s in samples {
        for (k, v) in &s.actions {
            *mean_actions.entry(k.clone()).or_insert(0.0) += *v as f64 / n as f64;
        }
    }
    Metrics {
        n,
        correct,
        acc,
        acc_stderr,
        yes_answers: samples.iter().filter(|s| s.prediction).count(),
        auc: auc(&scored),
        calibrated,
        recall_at_10: mean(&recalls),
        mean_steps: mean(&steps.iter().map(|&s| s as f64).collect::<Vec<_>>()),
        mean_actions,
        tokens_decoded: samples.iter().map(|s| s.tokens_decoded).sum(),
        tokens_without_reuse: samples.iter().map(|s| s.tokens_without_reuse).sum(),
        errors: samples.iter().filter(|s| s.error.is_some()).count(),
    }
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// ROC AUC of `score` for the positive label (ties count one half); `None` without both labels.
pub fn auc(scored: &[(f32, bool)]) -> Option<f64> {
    let pos = scored.iter().filter(|s| s.1).count();
    let neg = scored.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut sorted: Vec<(f32, bool)> = scored.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Mann–Whitney U: sum of the positives' (tie-averaged) ranks.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let avg_rank = (i + j + 1) as f64 / 2.0;
        rank_sum += avg_rank * sorted[i..j].iter().filter(|s| s.1).count() as f64;
        i = j;
    }
    let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos * neg) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::tests::sample;

    #[test]
    fn accuracy_and_stderr() {
        let mut samples = vec![sample(0, true), sample(1, true), sample(2, false)];
        samples.push(sample(3, true));
        samples[0].recall_at_10 = Some(0.5);
        samples[0].actions = BTreeMap::from([("Retrieve".into(), 8)]);
        let m = metrics(&samples, &[]);
        assert_eq!(m.correct, Some(3));
        assert_eq!(m.acc, Some(0.75));
        assert!((m.acc_stderr.unwrap() - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(m.recall_at_10, Some(0.5));
        assert_eq!(m.mean_actions["Retrieve"], 2.0);
        assert_eq!(m.yes_answers, 3);
    }

    #[test]
    fn auc_counts_ordered_pairs() {
        assert_eq!(auc(&[(1.0, true), (0.0, false)]), Some(1.0));
        assert_eq!(auc(&[(0.0, true), (1.0, false)]), Some(0.0));
        assert_eq!(auc(&[(0.5, true), (0.5, false)]), Some(0.5));
        assert_eq!(
            auc(&[(3.0, true), (1.0, true), (2.0, false), (0.0, false)]),
            Some(0.75)
        );
        assert_eq!(auc(&[(1.0, true)]), None);
    }

    #[test]
    fn an_offset_moves_the_threshold() {
        // Every margin is +1.9; gold is yes but for the last sample.
        let mut samples: Vec<Sample> = (0..4).map(|i| sample(i, false)).collect();
        samples[3].gold = Some(false);
        samples[3].correct = Some(true);
        let m = metrics(&samples, &[(2.0, "test"), (-2.0, "test")]);
        let c = &m.calibrated[0];
        assert_eq!(c.yes_answers, 4);
        assert_eq!(c.correct, Some(3));
        let c = &m.calibrated[1];
        assert_eq!((c.correct, c.yes_answers), (Some(1), 0));
    }
}
