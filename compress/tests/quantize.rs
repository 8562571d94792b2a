//! Round-to-nearest quantization against the shipped file: SmolLM2's Q4_1 GGUF was written by
//! llama.cpp's quantizer, so dequantizing it and quantizing back to Q4_1 must give the same bytes.

mod common;

use common::model_path;

use std::fs::File;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use geek_compress::quantize::{quantize_rtn, QuantType};
use geek_compress::BaseWeights;

#[test]
fn requantizing_the_shipped_q4_1_file_reproduces_llama_cpps_bytes() {
    let shipped = model_path();
    let base = BaseWeights::load(&shipped).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_1.gguf");
    let report = quantize_rtn(&base, QuantType::Q4_1, &out).unwrap();
    assert_eq!(report.tensors_by_type["q4_1"], 210);

    let mut a = File::open(&shipped).unwrap();
    let mut b = File::open(&out).unwrap();
    let (ca, cb) = (
        Content::read(&mut a).unwrap(),
        Content::read(&mut b).unwrap(),
    );
    let mut same = 0;
    for (name, info) in &ca.tensor_infos {
        let ta = ca.tensor(&mut a, name, &Device::Cpu).unwrap();
        let tb = cb.tensor(&mut b, name, &Device::Cpu).unwrap();
        assert_eq!(ta.dtype(), tb.dtype(), "{name}");
        assert_eq!(info.shape, cb.tensor_infos[name].shape, "{name}");
        assert!(ta.data().unwrap() == tb.data().unwrap(), "{name} differs");
        same += 1;
    }
    assert_eq!(same, 272);
}
