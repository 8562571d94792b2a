//! Checkpoint directories: JSON state beside tensors, replaced atomically.
//!
//! A checkpoint is written complete into a temporary directory and swapped in by two renames
//! (`dir` → `dir.old`, `tmp` → `dir`). A kill between them leaves only `dir.old`; [`exists`]
//! renames it back, so a resumed run never loses its last checkpoint.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::Device;
use serde::Serialize;

use crate::optim::{AdamW, NamedVars};
use crate::{Error, Result};

fn old_dir(dir: &Path) -> PathBuf {
    dir.with_extension("old")
}

/// Puts back `dir.old` when a kill left it without `dir`.
fn recover(dir: &Path) -> Result<()> {
    let old = old_dir(dir);
    if !dir.exists() && old.join("state.json").is_file() {
        tracing::warn!(checkpoint = %dir.display(), "restoring the checkpoint an interrupted save left aside");
        std::fs::rename(&old, dir).map_err(Error::io(dir))?;
    }
    Ok(())
}

/// Whether a complete checkpoint is at `dir` (after restoring one an interrupted save left aside).
pub(crate) fn exists(dir: &Path) -> Result<bool> {
    recover(dir)?;
    Ok(dir.join("state.json").is_file())
}

/// Writes `value` as pretty JSON.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, json).map_err(Error::io(path))
}

/// Reads JSON written by [`write_json`].
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces checkpoint directory `dir` by the complete `tmp`. A kill between the two renames
/// leaves only `dir.old`, which [`exists`] puts back.
pub(crate) fn swap_in(tmp: &Path, dir: &Path) -> Result<()> {
    let old = old_dir(dir);
    recover(dir)?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(Error::io(dir))?;
    }
    std::fs::rename(tmp, dir).map_err(Error::io(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Writes a checkpoint into `dir` — `state` as JSON, the variables and their Adam moments as
/// tensors — replacing the last one atomically.
pub(crate) fn save_run(
    dir: &Path,
    state: &impl Serialize,
    named: &NamedVars,
    opt: &AdamW,
) -> Result<()> {
    let mut tensors = HashMap::new();
    opt.moments("adam/", &mut tensors);
    for (name, var) in named {
        tensors.insert(format!("var/{name}"), var.as_tensor().clone());
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
    write_json(&tmp.join("state.json"), state)?;
    swap_in(&tmp, dir)
}

/// Reads back what [`save_run`] wrote at `step` into the variables and the optimizer.
pub(crate) fn load_run(dir: &Path, named: &NamedVars, opt: &mut AdamW, step: usize) -> Result<()> {
    let tensors = candle_core::safetensors::load(dir.join("state.safetensors"), &Device::Cpu)?;
    for (name, var) in named {
        let t = tensors
            .get(&format!("var/{name}"))
            .ok_or_else(|| Error::CheckpointMismatch {
                path: dir.to_path_buf(),
                message: format!("variable {name} is missing"),
            })?;
        var.set(t)?;
    }
    opt.restore("adam/", &tensors, step);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a kill between the two renames of `swap_in` left only `.old`, which resume
    /// ignored (training started over).
    #[test]
    fn a_kill_between_the_renames_loses_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let tmp = root.path().join("ckpt.tmp");
        std::fs::create_dir(&tmp).unwrap();
        write_json(&tmp.join("state.json"), &serde_json::json!({"step": 1})).unwrap();
        swap_in(&tmp, &dir).unwrap();
        assert!(exists(&dir).unwrap());
        // The first rename of the next save happened, then the process died.
        std::fs::rename(&dir, old_dir(&dir)).unwrap();
        assert!(exists(&dir).unwrap(), "the aside checkpoint is restored");
        let state: serde_json::Value = read_json(&dir.join("state.json")).unwrap();
        assert_eq!(state["step"], 1);
        assert!(!old_dir(&dir).exists());
        // And a save over a restored checkpoint replaces it.
        std::fs::create_dir(&tmp).unwrap();
        write_json(&tmp.join("state.json"), &serde_json::json!({"step": 2})).unwrap();
        swap_in(&tmp, &dir).unwrap();
        let state: serde_json::Value = read_json(&dir.join("state.json")).unwrap();
        assert_eq!(state["step"], 2);
    }
}
