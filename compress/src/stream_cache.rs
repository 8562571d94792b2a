//! The frozen layers below a top-layers adapter ([`crate::AdapterConfig::top_layers`]), run
//! once per example and kept: later epochs and held-out evaluations start at the first adapted
//! layer. With a directory, each stream is also written there under a name made of its
//! tokens (content-addressed, so runs of other adapters on the same base, layer and examples
//! share them, and a resumed run does not compute them again).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::data::Row;
use crate::model::{AdaptedModel, Batch};
use crate::optim::fingerprint;
use crate::{Error, Result};

/// Residual streams entering the first adapted layer, one per example id.
pub(crate) struct StreamCache {
    first: usize,
    streams: HashMap<usize, Tensor>,
    bytes: usize,
    /// Where streams are written and read, when on disk too.
    dir: Option<PathBuf>,
}

impl StreamCache {
    /// An empty cache of the streams entering layer `first` of the model in `base` (a GGUF
    /// file), kept on disk under `dir` too when given: in a subdirectory named after the
    /// base file (path, size, modification time) and the layer.
    pub(crate) fn new(first: usize, base: &Path, dir: Option<&Path>) -> Result<StreamCache> {
        let dir = match dir {
            None => None,
            Some(root) => {
                let meta = std::fs::metadata(base).map_err(Error::io(base))?;
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                let key = format!("{}|{}|{modified}|{first}", base.display(), meta.len());
                let words: Vec<u32> = key.bytes().map(u32::from).collect();
                let stem = base.file_stem().unwrap_or_default().to_string_lossy();
                let sub = root.join(format!(
                    "{stem}-layer{first}-{}",
                    fingerprint([words.as_slice()], None)
                ));
                std::fs::create_dir_all(&sub).map_err(Error::io(&sub))?;
                Some(sub)
            }
        };
        Ok(StreamCache {
            first,
            streams: HashMap::new(),
            bytes: 0,
            dir,
        })
    }

    /// The stream of one example's `tokens`: read from disk when written before, else
    /// computed (and written).
    fn compute(&self, model: &AdaptedModel, tokens: &[u32]) -> Result<Tensor> {
        let file = self.dir.as_ref().map(|d| {
            d.join(format!(
                "{}.safetensors",
                fingerprint([tokens], None).replace('x', "-")
            ))
        });
        if let Some(file) = file.as_ref().filter(|f| f.is_file()) {
            let mut read = candle_core::safetensors::load(file, &Device::Cpu)?;
            if let Some(stream) = read.remove("stream") {
                if stream.dim(0)? == tokens.len() {
                    return Ok(stream);
                }
            }
        }
        let stream = model
            .stream_at(&Batch::single(tokens)?, self.first)?
            .detach();
        if let Some(file) = file {
            let tmp = file.with_extension("partial");
            candle_core::safetensors::save(&HashMap::from([("stream", stream.clone())]), &tmp)?;
            std::fs::rename(&tmp, &file).map_err(Error::io(&file))?;
        }
        Ok(stream)
    }

    /// The layer the cached streams enter.
    pub(crate) fn first_layer(&self) -> usize {
        self.first
    }

    /// Bytes the cached streams hold.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The stream `[b·t, n_embd]` entering the first adapted layer for packed `rows`. The
    /// example of a row's segment `j` has the id `id_base + row.examples[j]`; an example seen
    /// before is read from the cache (each segment attends only within itself from position 0,
    /// so its stream does not depend on the row it is packed in). Padding gets zeros: nothing
    /// attends to it and no target is read there.
    pub(crate) fn rows_input(
        &mut self,
        model: &AdaptedModel,
        rows: &[Row],
        id_base: usize,
    ) -> Result<Tensor> {
        let t = rows.first().map_or(0, |r| r.tokens.len());
        let n_embd = model.config().n_embd;
        let mut parts = Vec::new();
        for row in rows {
            let mut start = 0;
            for (&len, &example) in row.segments.iter().zip(&row.examples) {
                let id = id_base + example;
                if !self.streams.contains_key(&id) {
                    let stream = self.compute(model, &row.tokens[start..start + len])?;
                    self.bytes += stream.elem_count() * std::mem::size_of::<f32>();
                    self.streams.insert(id, stream);
                }
                parts.push(self.streams[&id].clone());
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
