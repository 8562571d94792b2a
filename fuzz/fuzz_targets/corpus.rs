//! The three corpus readers on any bytes (the first byte picks the reader).
#![no_main]
mod common;

use geek_retriever::CorpusSource;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let path = common::scratch("corpus", rest);
    let source = match kind % 3 {
        0 => CorpusSource::StrategyQaParagraphs(path),
        1 => CorpusSource::WikiVital(path),
        _ => CorpusSource::Jsonl(path),
    };
    let _ = source.load();
});
