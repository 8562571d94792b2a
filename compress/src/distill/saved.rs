//! Checkpoints of a learned quantization: what is saved besides the variables, and how a
//! run resumes from it.

use super::*;

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    pub(super) step: usize,
    pub(super) best_step: usize,
    pub(super) best_kl: f64,
    pub(super) config: LearnedConfig,
    pub(super) base: String,
    pub(super) data: String,
}

/// The lowest held-out KL so far and the variables that gave it.
pub(super) struct Best {
    pub(super) step: usize,
    pub(super) kl: f64,
    pub(super) tensors: HashMap<String, Tensor>,
}

/// Deep copies of the variables (a `Var` is updated in place).
pub(super) fn snapshot(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Removes the tensors named `{prefix}…` from `tensors`, returning them without the prefix.
pub(super) fn take_prefixed(
    tensors: &mut HashMap<String, Tensor>,
    prefix: &str,
) -> HashMap<String, Tensor> {
    let names: Vec<String> = tensors
        .keys()
        .filter(|n| n.starts_with(prefix))
        .cloned()
        .collect();
    names
        .into_iter()
        .filter_map(|n| {
            let t = tensors.remove(&n)?;
            Some((n[prefix.len()..].to_string(), t))
        })
        .collect()
}

pub(super) struct Saved {
    pub(super) state: CheckpointState,
    pub(super) moments: HashMap<String, Tensor>,
    pub(super) bank: Option<Tensor>,
}

/// A fingerprint of calibration rows (a checkpoint of other rows is refused).
pub(crate) fn rows_fingerprint(rows: &[Vec<u32>]) -> String {
    fingerprint(rows.iter().map(Vec::as_slice), Some(u32::MAX))
}

pub(super) fn save(
    dir: &Path,
    state: &CheckpointState,
    scales: &[(String, Var)],
    weights: &[(String, Var)],
    moments: &HashMap<String, Tensor>,
    bank: Option<&Tensor>,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    let mut vars: HashMap<String, Tensor> = scales
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    if state.config.train_weights {
        vars.extend(
            weights
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone())),
        );
    }
    let mut tensors = moments.clone();
    tensors.extend(vars.into_iter().map(|(n, t)| (format!("var/{n}"), t)));
    if let Some(b) = bank {
        tensors.insert("bank".into(), b.clone());
    }
    candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
    write_json(&tmp.join("state.json"), state)?;
    swap_in(&tmp, dir)
}

pub(super) fn resume(
    dir: &Path,
    fresh: &CheckpointState,
    scales: &[(String, Var)],
    weights: &[(String, Var)],
) -> Result<Saved> {
    let state: CheckpointState = read_json(&dir.join("state.json"))?;
    let mismatch = |message: String| Error::CheckpointMismatch {
        path: dir.to_path_buf(),
        message,
    };
    if state.base != fresh.base {
        return Err(mismatch(format!(
            "base model {} vs {}",
            state.base, fresh.base
        )));
    }
    if state.data != fresh.data {
        return Err(mismatch("the calibration data differs".into()));
    }
    let comparable = LearnedConfig {
        steps: fresh.config.steps,
        checkpoint_every: fresh.config.checkpoint_every,
        ..state.config.clone()
    };
    if comparable != fresh.config {
        return Err(mismatch(format!(
            "settings {:?} vs {:?}",
            state.config, fresh.config
        )));
    }
    let mut tensors = candle_core::safetensors::load(dir.join("state.safetensors"), &Device::Cpu)?;
    let trained = scales.iter().chain(if state.config.train_weights {
        weights
    } else {
        &[]
    });
    for (name, var) in trained {
        let t = tensors
            .remove(&format!("var/{name}"))
            .ok_or_else(|| mismatch(format!("variable {name} is missing")))?;
        var.set(&t)?;
    }
    let bank = tensors.remove("bank");
    Ok(Saved {
        state,
        moments: tensors,
        bank,
    })
}
