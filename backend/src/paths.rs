//! Where geek keeps things: every directory rule in one place.
//!
//! | what | default | override |
//! |---|---|---|
//! | models | `<user cache>/geek/models` | `--models-dir`, `GEEK_MODELS_DIR` |
//! | file hashes, saved system prompts, the TUI log | `<user cache>/geek/` | `GEEK_LOG` (log) |
//! | the passage index | `<user data>/geek/index` | `--index`, `GEEK_INDEX` |
//! | calibration offsets | `<user data>/geek/calibration.json` | `GEEK_CALIBRATION` |
//! | StrategyQA and corpora (read only) | `../shared/data` | `--data-dir`, `GEEK_DATA_DIR` |
//!
//! The user cache and data directories are the platform's (`~/.cache`, `~/.local/share` on
//! Linux); where they cannot be found, hidden directories in the working directory stand in.

use std::path::{Path, PathBuf};

fn project() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "geek")
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `<user cache>/geek`.
pub fn cache_dir() -> PathBuf {
    project().map_or_else(
        || PathBuf::from(".geek-cache"),
        |d| d.cache_dir().to_path_buf(),
    )
}

/// `<user data>/geek`.
pub fn data_home() -> PathBuf {
    project().map_or_else(
        || PathBuf::from(".geek-data"),
        |d| d.data_dir().to_path_buf(),
    )
}

/// The models directory: `explicit`, else `$GEEK_MODELS_DIR`, else `<user cache>/geek/models`.
pub fn models_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| env_path("GEEK_MODELS_DIR"))
        .unwrap_or_else(|| cache_dir().join("models"))
}

/// Where model files' sha256 are remembered.
pub fn sha256_cache_file() -> PathBuf {
    cache_dir().join("sha256.json")
}

/// Where decoded system prompts are saved (llama.cpp sequence states).
pub fn prompt_cache_dir() -> PathBuf {
    cache_dir().join("kv")
}

/// The TUI's log file: `$GEEK_LOG`, else `<user cache>/geek/tui.log`.
pub fn log_file() -> PathBuf {
    env_path("GEEK_LOG").unwrap_or_else(|| cache_dir().join("tui.log"))
}

/// The default passage index directory: `<user data>/geek/index`.
pub fn index_dir() -> PathBuf {
    data_home().join("index")
}

/// The calibration store: `$GEEK_CALIBRATION`, else `<user data>/geek/calibration.json`.
pub fn calibration_store() -> PathBuf {
    env_path("GEEK_CALIBRATION").unwrap_or_else(|| data_home().join("calibration.json"))
}

/// The shared data directory: `explicit`, else `$GEEK_DATA_DIR`, else `../shared/data`.
pub fn data_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| env_path("GEEK_DATA_DIR"))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_paths_win() {
        let p = Path::new("/somewhere/models");
        assert_eq!(models_dir(Some(p)), p);
        assert_eq!(data_dir(Some(p)), p);
        assert!(index_dir().ends_with("index"));
        assert!(prompt_cache_dir().starts_with(cache_dir()));
    }
}
