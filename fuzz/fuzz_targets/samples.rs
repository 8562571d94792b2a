//! The samples reader on any bytes: it never fails and never writes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let read = geek_evals::samples::parse_samples(data);
    assert!(read.samples.len() + read.damaged.len() <= data.iter().filter(|&&b| b == b'\n').count());
    let _ = geek_evals::metrics::metrics(&read.samples, &[(0.5, "fuzz")]);
});
