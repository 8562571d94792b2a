//! The frozen layers below a top-layers adapter ([`crate::AdapterConfig::top_layers`]), run
//! once per example and kept: later epochs and held-out evaluations start at the first adapted
//! layer. Each stream is also written to a directory under a name made of its tokens
//! (content-addressed, so runs of other adapters on the same base, layer and examples share
//! them, and a resumed run does not compute them again).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::data::Row;
use crate::model::{AdaptedModel, Batch};
use crate::optim::fingerprint;
use crate::{Error, Result};

/// Residual streams entering the first adapted layer, keyed by their example's tokens.
pub(crate) struct StreamCache {
    first: usize,
    streams: HashMap<String, Tensor>,
    /// Where streams are written and read.
    dir: PathBuf,
}

/// The name of an example's stream: a hash of its tokens (and their count).
fn key(tokens: &[u32]) -> String {
    fingerprint([tokens], None).replace('x', "-")
}

impl StreamCache {
    /// An empty cache of the streams entering layer `first` of the model in `base` (a GGUF
    /// file), kept on disk under `root` too: in a subdirectory named after the base file
    /// (path, size, modification time) and the layer.
    pub(crate) fn new(first: usize, base: &Path, root: &Path) -> Result<StreamCache> {
        let meta = std::fs::metadata(base).map_err(Error::io(base))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let id = format!("{}|{}|{modified}|{first}", base.display(), meta.len());
        let words: Vec<u32> = id.bytes().map(u32::from).collect();
        let stem = base.file_stem().unwrap_or_default().to_string_lossy();
        let dir = root.join(format!(
            "{stem}-layer{first}-{}",
            fingerprint([words.as_slice()], None)
        ));
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        Ok(StreamCache {
            first,
            streams: HashMap::new(),
            dir,
        })
    }

    /// The stream of one example's `tokens`: read from disk when written before, else
    /// computed (and written).
    fn compute(&self, model: &AdaptedModel, tokens: &[u32], key: &str) -> Result<Tensor> {
        let file = self.dir.join(format!("{key}.safetensors"));
        if file.is_file() {
            let mut read = candle_core::safetensors::load(&file, &Device::Cpu)?;
            if let Some(stream) = read.remove("stream") {
                if stream.dim(0)? == tokens.len() {
                    return Ok(stream);
                }
            }
        }
        let stream = model
            .stream_at(&Batch::single(tokens)?, self.first)?
            .detach();
        let tmp = file.with_extension("partial");
        candle_core::safetensors::save(&HashMap::from([("stream", stream.clone())]), &tmp)?;
        std::fs::rename(&tmp, &file).map_err(Error::io(&file))?;
        Ok(stream)
    }

    /// The layer the cached streams enter.
    pub(crate) fn first_layer(&self) -> usize {
        self.first
    }

    /// Bytes the cached streams hold.
    pub(crate) fn bytes(&self) -> usize {
        let values: usize = self.streams.values().map(Tensor::elem_count).sum();
        values * std::mem::size_of::<f32>()
    }

    /// The stream `[b·t, n_embd]` entering the first adapted layer for packed `rows`. Each
    /// segment (one example) is read from the cache when its tokens were seen before: it
    /// attends only within itself from position 0, so its stream does not depend on the row it
    /// is packed in. Padding gets zeros: nothing attends to it and no target is read there.
    pub(crate) fn rows_input(&mut self, model: &AdaptedModel, rows: &[Row]) -> Result<Tensor> {
        let t = rows.first().map_or(0, |r| r.tokens.len());
        let n_embd = model.config().n_embd;
        let mut parts = Vec::new();
        for row in rows {
            let mut start = 0;
            for &len in &row.segments {
                let tokens = &row.tokens[start..start + len];
                let key = key(tokens);
                let stream = match self.streams.get(&key) {
                    Some(stream) => stream.clone(),
                    None => {
                        let stream = self.compute(model, tokens, &key)?;
                        self.streams.insert(key, stream.clone());
                        stream
                    }
                };
                parts.push(stream);
                start += len;
            }
            if start < t {
                parts.push(Tensor::zeros(
                    (t - start, n_embd),
                    DType::F32,
                    &Device::Cpu,
                )?);
            }
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
