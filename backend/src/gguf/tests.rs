//! The GGUF reader against well-formed, truncated and hostile files.

use super::*;
use std::io::Write;

/// Writes a minimal GGUF v3 file with one string key and one F32 tensor of `n` elements,
/// then cuts it to `keep` bytes.
fn write_gguf(dir: &Path, arch: &str, n: u64, keep: Option<usize>) -> PathBuf {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // kv
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
    b.extend_from_slice(arch.as_bytes());
    let name = b"w";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(std::iter::repeat_n(0u8, n as usize * 4));
    if let Some(k) = keep {
        b.truncate(k);
    }
    let path = dir.join(format!("{arch}-{n}-{keep:?}.gguf"));
    std::fs::File::create(&path).unwrap().write_all(&b).unwrap();
    path
}

#[test]
fn reads_a_well_formed_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(write_gguf(dir.path(), "llama", 64, None)).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.parameter_count(), 64);
    assert_eq!(f.tensor_type_counts().get("F32"), Some(&1));
    f.check_architecture().unwrap();
}

#[test]
fn truncated_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let full = write_gguf(dir.path(), "llama", 64, None);
    let len = std::fs::metadata(&full).unwrap().len() as usize;
    for keep in [6, 30, 60, len - 1] {
        let err = GgufFile::open(write_gguf(dir.path(), "llama", 64, Some(keep))).unwrap_err();
        assert!(
            matches!(err, Error::CorruptGguf { .. }),
            "keep={keep}: {err}"
        );
    }
}

#[test]
fn garbage_is_not_gguf_and_missing_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.gguf");
    std::fs::write(&p, b"<html>not a model</html>").unwrap();
    assert!(matches!(GgufFile::open(&p), Err(Error::NotGguf { .. })));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(GgufFile::open(&empty), Err(Error::NotGguf { .. })));
    assert!(matches!(
        GgufFile::open(dir.path().join("nope.gguf")),
        Err(Error::ModelNotFound(_))
    ));
}

#[test]
fn unknown_architecture_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(write_gguf(dir.path(), "frobnicator", 8, None)).unwrap();
    assert!(matches!(
        f.check_architecture(),
        Err(Error::UnsupportedArchitecture { architecture, .. }) if architecture == "frobnicator"
    ));
}

/// Appends a GGUF v3 header with `n_tensors` claimed and the given metadata bytes.
fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn key(b: &mut Vec<u8>, name: &str, ty: u32) {
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
}

/// Regression: a header claiming billions of tensors made the reader allocate for all of
/// them up front and abort the process.
#[test]
fn a_huge_tensor_count_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = header(1 << 32, 0);
    b.resize(1 << 20, 0);
    let p = dir.path().join("claims.gguf");
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(GgufFile::open(&p), Err(Error::CorruptGguf { .. })));
}

/// Regression: a shape of 2^32 × 2^32 overflowed to 0 elements and passed.
#[test]
fn overflowing_shapes_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = header(1, 0);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'w');
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 32).to_le_bytes());
    b.extend_from_slice(&(1u64 << 32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(4096, 0);
    let p = dir.path().join("overflow.gguf");
    std::fs::write(&p, &b).unwrap();
    let err = GgufFile::open(&p).unwrap_err();
    assert!(err.to_string().contains("overflow"), "{err}");
}

/// Regression: a 128 MB array of bytes cost 4.2 GB as one `Value` per element.
#[test]
fn long_arrays_are_kept_by_length() {
    let dir = tempfile::tempdir().unwrap();
    let n: u64 = 8 << 20;
    let mut b = header(0, 2);
    key(&mut b, "general.architecture", 8);
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"llama");
    key(&mut b, "big", 9);
    b.extend_from_slice(&0u32.to_le_bytes()); // u8 elements
    b.extend_from_slice(&n.to_le_bytes());
    b.resize(b.len() + n as usize, 7);
    let p = dir.path().join("array.gguf");
    std::fs::write(&p, &b).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(
        f.metadata["big"],
        Value::LongArray {
            elem_type: 0,
            len: n
        }
    );
    assert_eq!(f.metadata["big"].array_len(), Some(n));
    assert_eq!(f.architecture(), Some("llama"));
    // Cut inside the array: corrupt, not a panic.
    std::fs::write(&p, &b[..b.len() - 10]).unwrap();
    assert!(matches!(GgufFile::open(&p), Err(Error::CorruptGguf { .. })));
}

/// Regression: `general.alignment = 0` divided by zero (in candle, which compress used).
#[test]
fn a_zero_alignment_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = header(0, 1);
    key(&mut b, "general.alignment", 4);
    b.extend_from_slice(&0u32.to_le_bytes());
    let p = dir.path().join("align.gguf");
    std::fs::write(&p, &b).unwrap();
    let err = GgufFile::open(&p).unwrap_err();
    assert!(err.to_string().contains("alignment"), "{err}");
}

/// A file of only `metadata` (no tensors), for the metadata helpers.
fn with_metadata(metadata: Vec<(&str, Value)>) -> GgufFile {
    GgufFile {
        path: PathBuf::from("m.gguf"),
        version: 3,
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        tensors: Vec::new(),
        data_offset: 0,
        file_size: 0,
    }
}

#[test]
fn the_kv_cache_is_sized_from_one_head_count_or_one_per_layer() {
    let llama = with_metadata(vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U64(30)),
        ("llama.attention.head_count", Value::U64(9)),
        ("llama.attention.head_count_kv", Value::U64(3)),
        ("llama.embedding_length", Value::U64(576)),
    ]);
    // SmolLM2: 30 layers × 3 KV heads × (64 + 64) per cell, f16.
    assert_eq!(llama.kv_cache_bytes(100, 2), Some(30 * 3 * 128 * 100 * 2));
    // A pruned (deci) model: KV heads per layer, the hidden width no longer heads × 64.
    let deci = with_metadata(vec![
        ("general.architecture", Value::String("deci".into())),
        ("deci.block_count", Value::U64(3)),
        (
            "deci.attention.head_count",
            Value::Array(vec![Value::U64(6), Value::U64(3), Value::U64(9)]),
        ),
        (
            "deci.attention.head_count_kv",
            Value::Array(vec![Value::U64(2), Value::U64(1), Value::U64(3)]),
        ),
        ("deci.embedding_length", Value::U64(448)),
        ("deci.attention.key_length", Value::U64(64)),
        ("deci.attention.value_length", Value::U64(64)),
    ]);
    assert_eq!(
        deci.kv_cache_bytes(100, 2),
        Some((2 + 1 + 3) * 128 * 100 * 2)
    );
}
