//! Shared by the integration tests: where the real model is.
#![allow(dead_code)] // each test file uses part of it

use std::path::PathBuf;

use geek_backend::{catalog, Engine, EngineConfig};

/// The PyPI-shipped SmolLM2 model: `$GEEK_TEST_MODEL`, else the default model in the models
/// directory. Its absence is a test failure, not a skip: CI pulls it first.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("GEEK_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            geek_backend::paths::models_dir(None).join(catalog::test_model().file_name)
        });
    assert!(
        path.is_file(),
        "test model {} is missing: run `geek model pull` (or set GEEK_TEST_MODEL)",
        path.display()
    );
    path
}

/// An engine on the test model with 2 threads and this context size.
pub fn engine_with(n_ctx: u32) -> Engine {
    Engine::load(
        EngineConfig::new(model_path())
            .with_threads(2)
            .with_n_ctx(n_ctx),
    )
    .expect("the test model loads")
}

/// An engine on the test model with a 2048-token context.
pub fn engine() -> Engine {
    engine_with(2048)
}

/// Serialises the tests of one binary that run the model: llama.cpp's worker threads spin while
/// they wait, so two models decoding at once on a 2-core machine slow each other down by an
/// order of magnitude (a CI run took 52 minutes this way). Hold the guard for the whole test.
pub fn one_model_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
