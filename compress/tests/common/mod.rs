//! Shared by the integration tests: where the real model is, and one model at a time.
#![allow(dead_code)] // each test file uses part of it

use std::path::PathBuf;

use geek_backend::catalog;

/// The PyPI-shipped SmolLM2 GGUF (`$GEEK_TEST_MODEL` overrides). Missing is a failure.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("GEEK_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| catalog::models_dir(None).join(catalog::default_model().file_name));
    assert!(
        path.is_file(),
        "test model {} missing: run `geek model pull`",
        path.display()
    );
    path
}

/// Serialises the tests of one binary that run a model: llama.cpp and candle both want the
/// two cores. Hold the guard for the whole test.
pub fn one_model_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
