//! The GGUF reader on any bytes: a typed error or a file, never a panic or an abort.
#![no_main]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = common::scratch("model.gguf", data);
    if let Ok(file) = geek_backend::gguf::GgufFile::open(&path) {
        let _ = file.parameter_count();
        let _ = file.tensor_type_counts();
        let _ = file.kv_cache_bytes(4096, 2);
        let _ = file.check_architecture();
        for t in &file.tensors {
            let _ = t.n_bytes();
        }
    }
});
