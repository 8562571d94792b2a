//! The StrategyQA loader on any bytes.
#![no_main]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = common::scratch("dataset.json", data);
    if let Ok(questions) = geek_evals::strategyqa::load(&path) {
        for q in &questions {
            let _ = q.gold_paragraphs();
        }
    }
});
