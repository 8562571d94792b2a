//! The HTML stripper on any text.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let out = geek_retriever::html_to_text(text);
        assert!(!out.contains("  "));
    }
});
