//! Calibrated yes/no: a decision offset added to `log p(yes) − log p(no)`.
//!
//! A model's raw margin is biased (SmolLM2 says "no" 299 times in 300; the 1.5B "yes" 215
//! times). Two ways to correct it, both an offset per (model file, method, prompt version):
//! - **fitted** ([`fit_offset`]): the threshold that maximises accuracy on StrategyQA *train*
//!   questions (`geek eval calibrate`; never dev or test);
//! - **contextual** ([`contextual_offset`], Zhao et al. 2021): the margin the model gives a
//!   content-free input ("N/A"), which needs no labelled data at all.
//!
//! Offsets live in a [`CalibrationStore`] (`geek_backend::paths::calibration_store`);
//! [`BUILTIN`] holds the ones fitted for the catalogue's default model, shipped with geek.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What an offset is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CalibrationKey {
    /// sha256 of the model file.
    pub model_sha256: String,
    /// Method name (`direct`, `geek`, …).
    pub method: String,
    /// The method's prompt version.
    pub prompt_version: String,
}

impl CalibrationKey {
    fn id(&self, kind: &str) -> String {
        format!(
            "{}:{}:{}:{kind}",
            self.model_sha256, self.method, self.prompt_version
        )
    }
}

/// How an offset was found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CalibrationSource {
    /// Fitted on labelled train questions.
    Fitted {
        /// Questions it was fitted on.
        questions: usize,
        /// Their accuracy before the offset.
        raw_accuracy: f64,
        /// Their accuracy with it.
        calibrated_accuracy: f64,
    },
    /// The margin on content-free inputs.
    Contextual {
        /// The inputs.
        inputs: Vec<String>,
    },
}

/// A decision offset and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The key it belongs to.
    pub key: CalibrationKey,
    /// Added to every margin: yes iff `margin + offset > 0`.
    pub offset: f32,
    /// How it was found.
    pub source: CalibrationSource,
}

impl Calibration {
    /// `fitted` or `contextual`.
    pub fn kind(&self) -> &'static str {
        match self.source {
            CalibrationSource::Fitted { .. } => "fitted",
            CalibrationSource::Contextual { .. } => "contextual",
        }
    }

    /// A short description for traces and tables (`fitted on 500 train`, `contextual`).
    pub fn describe(&self) -> String {
        match &self.source {
            CalibrationSource::Fitted { questions, .. } => format!("fitted on {questions} train"),
            CalibrationSource::Contextual { .. } => "contextual".into(),
        }
    }
}

/// Offsets fitted with `geek eval calibrate` on StrategyQA train for the catalogue's default
/// model and shipped with geek (see README, "Calibration"). The store overrides them.
pub const BUILTIN: &[(&str, &str, &str, f32, usize)] = &[];

/// The content-free inputs of contextual calibration (Zhao et al. 2021 use "N/A", "[MASK]"
/// and the empty string; an empty question is refused here, so "?" stands in).
pub const CONTENT_FREE: &[&str] = &["N/A", "[MASK]", "?"];

/// The offset that makes the share of "yes" answers over `(margin, gold)` pairs equal the
/// share of gold "yes": minus the margin at that quantile (0 when there is nothing to fit).
///
/// Matching the answer prior, rather than maximising accuracy, keeps a few hundred
/// questions from over-fitting the threshold: where the margin ranks answers no better than
/// chance, accuracy is maximised by answering every question with the majority class, and
/// that is not a calibration.
pub fn fit_offset(scored: &[(f32, bool)]) -> f32 {
    if scored.is_empty() {
        return 0.0;
    }
    let mut margins: Vec<f32> = scored.iter().map(|s| s.0).collect();
    margins.sort_by(f32::total_cmp);
    let yes = scored.iter().filter(|s| s.1).count();
    let no = margins.len() - yes;
    // The threshold between the `no` lowest margins and the `yes` highest ones.
    let threshold = match (no.checked_sub(1).map(|i| margins[i]), margins.get(no)) {
        (Some(lo), Some(&hi)) => (lo + hi) / 2.0,
        (None, Some(&hi)) => hi - 1.0,
        (Some(lo), None) => lo + 1.0,
        (None, None) => 0.0,
    };
    -threshold
}

/// Contextual calibration: the offset that makes the content-free inputs' average
/// probabilities of yes and no equal, from their margins.
pub fn contextual_offset(margins: &[f32]) -> f32 {
    if margins.is_empty() {
        return 0.0;
    }
    // p(yes | yes or no) = sigmoid(margin); average the probabilities, not the margins.
    let p: f64 = margins
        .iter()
        .map(|&m| 1.0 / (1.0 + (-(m as f64)).exp()))
        .sum::<f64>()
        / margins.len() as f64;
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    -((p / (1.0 - p)).ln() as f32)
}

/// The offsets known on this machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CalibrationStore {
    /// By key id.
    pub entries: BTreeMap<String, Calibration>,
}

impl CalibrationStore {
    /// Reads the store at `path` (a missing file is an empty store; nothing is written).
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Dataset {
                path: path.to_path_buf(),
                reason: format!("not a calibration store: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The offset fitted on train for `key`: the store's, else a built-in one.
    pub fn fitted(&self, key: &CalibrationKey) -> Option<Calibration> {
        self.entries
            .get(&key.id("fitted"))
            .cloned()
            .or_else(|| builtin(key))
    }

    /// The contextual offset for `key`, when it has been computed.
    pub fn contextual(&self, key: &CalibrationKey) -> Option<Calibration> {
        self.entries.get(&key.id("contextual")).cloned()
    }

    /// The offset `ask`, the TUI and `eval` apply: fitted, else contextual.
    pub fn preferred(&self, key: &CalibrationKey) -> Option<Calibration> {
        self.fitted(key).or_else(|| self.contextual(key))
    }

    /// Records `calibration` in the store at `path` (re-read under a lock, written atomically).
    pub fn save(path: &Path, calibration: Calibration) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock_path = path.with_extension("json.lock");
        let lock = std::fs::File::create(&lock_path).map_err(io)?;
        lock.lock().map_err(io)?;
        let mut store = Self::load(path)?;
        store
            .entries
            .insert(calibration.key.id(calibration.kind()), calibration.clone());
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&store).expect("serializable"),
        )
        .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn builtin(key: &CalibrationKey) -> Option<Calibration> {
    BUILTIN
        .iter()
        .find(|(sha, method, version, _, _)| {
            *sha == key.model_sha256 && *method == key.method && *version == key.prompt_version
        })
        .map(|&(_, _, _, offset, questions)| Calibration {
            key: key.clone(),
            offset,
            source: CalibrationSource::Fitted {
                questions,
                raw_accuracy: f64::NAN,
                calibrated_accuracy: f64::NAN,
            },
        })
}

/// The calibrations of `key`, for reports: the fitted offset when there is one, then the
/// contextual offset, computed with `answerer` (and stored) the first time it is needed.
pub async fn offsets_for(
    store_path: &Path,
    key: &CalibrationKey,
    answerer: &crate::methods::Answerer,
    method: crate::methods::Method,
) -> Result<Vec<Calibration>> {
    let store = CalibrationStore::load(store_path)?;
    let mut out: Vec<Calibration> = store.fitted(key).into_iter().collect();
    let contextual = match store.contextual(key) {
        Some(c) => c,
        None => {
            let margins = answerer.content_free_margins(method).await?;
            let c = Calibration {
                key: key.clone(),
                offset: contextual_offset(&margins),
                source: CalibrationSource::Contextual {
                    inputs: CONTENT_FREE.iter().map(|s| s.to_string()).collect(),
                },
            };
            tracing::info!(offset = c.offset, ?margins, "contextual calibration");
            CalibrationStore::save(store_path, c.clone())?;
            c
        }
    };
    out.push(contextual);
    Ok(out)
}

/// Fits the offset of `key` on the labelled `samples` and stores it.
pub fn fit_and_store(
    store_path: &Path,
    key: &CalibrationKey,
    samples: &[crate::samples::Sample],
) -> Result<Calibration> {
    let scored: Vec<(f32, bool)> = samples
        .iter()
        .filter_map(|s| Some((s.margin()?, s.gold?)))
        .collect();
    if scored.is_empty() {
        return Err(Error::Config(
            "no labelled answers with margins to fit a calibration on".into(),
        ));
    }
    let offset = fit_offset(&scored);
    let accuracy = |o: f32| {
        scored.iter().filter(|(m, g)| (m + o > 0.0) == *g).count() as f64 / scored.len() as f64
    };
    let calibration = Calibration {
        key: key.clone(),
        offset,
        source: CalibrationSource::Fitted {
            questions: scored.len(),
            raw_accuracy: accuracy(0.0),
            calibrated_accuracy: accuracy(offset),
        },
    };
    CalibrationStore::save(store_path, calibration.clone())?;
    Ok(calibration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accuracy(scored: &[(f32, bool)], offset: f32) -> usize {
        scored
            .iter()
            .filter(|(m, g)| (m + offset > 0.0) == *g)
            .count()
    }

    #[test]
    fn the_fitted_offset_matches_the_answer_prior() {
        // A model biased to yes: every margin is 2 too high.
        let scored: Vec<(f32, bool)> = (0..40)
            .map(|i| {
                let gold = i % 2 == 0;
                let m = if gold { 1.0 } else { -1.0 } + 2.0 + (i as f32) * 0.01;
                (m, gold)
            })
            .collect();
        assert_eq!(accuracy(&scored, 0.0), 20);
        let offset = fit_offset(&scored);
        // Separable margins: matching the prior separates them.
        assert_eq!(accuracy(&scored, offset), 40);
        assert!((-3.5..-1.0).contains(&offset), "{offset}");
        // Half the answers are yes after the offset, as half the gold answers are.
        let yes = scored.iter().filter(|(m, _)| m + offset > 0.0).count();
        assert_eq!(yes, 20);
        assert_eq!(fit_offset(&[]), 0.0);
        assert!(fit_offset(&[(0.5, true)]) + 0.5 > 0.0);
        assert!(fit_offset(&[(0.5, false)]) + 0.5 <= 0.0);
    }

    #[test]
    fn contextual_offset_cancels_the_content_free_bias() {
        assert_eq!(contextual_offset(&[]), 0.0);
        assert!((contextual_offset(&[1.5]) + 1.5).abs() < 1e-4);
        // Probabilities are averaged: 0.5 and 0.5 give no offset whatever the margins' sum.
        assert!(contextual_offset(&[0.0, 0.0]).abs() < 1e-6);
        assert!(contextual_offset(&[3.0, -3.0]).abs() < 1e-4);
    }

    #[test]
    fn the_store_round_trips_and_reading_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("calibration.json");
        assert_eq!(
            CalibrationStore::load(&path).unwrap(),
            CalibrationStore::default()
        );
        assert!(!path.exists());
        let key = CalibrationKey {
            model_sha256: "abc".into(),
            method: "direct".into(),
            prompt_version: "v1".into(),
        };
        let cal = Calibration {
            key: key.clone(),
            offset: -1.25,
            source: CalibrationSource::Contextual {
                inputs: vec!["N/A".into()],
            },
        };
        CalibrationStore::save(&path, cal.clone()).unwrap();
        let store = CalibrationStore::load(&path).unwrap();
        assert_eq!(store.contextual(&key), Some(cal.clone()));
        assert_eq!(store.fitted(&key), None);
        assert_eq!(store.preferred(&key), Some(cal));
        std::fs::write(&path, "{oops").unwrap();
        assert!(CalibrationStore::load(&path).is_err());
    }
}
