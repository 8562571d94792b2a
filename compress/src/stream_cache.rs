//! The frozen layers below a top-layers adapter ([`crate::AdapterConfig::top_layers`]), run
//! once per example and kept: later epochs and held-out evaluations start at the first adapted
//! layer.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::data::Row;
use crate::model::{AdaptedModel, Batch};
use crate::Result;

/// Residual streams entering the first adapted layer, one per example id.
pub(crate) struct StreamCache {
    first: usize,
    streams: HashMap<usize, Tensor>,
    bytes: usize,
}

impl StreamCache {
    /// An empty cache of the streams entering layer `first`.
    pub(crate) fn new(first: usize) -> StreamCache {
        StreamCache {
            first,
            streams: HashMap::new(),
            bytes: 0,
        }
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
                    let tokens = &row.tokens[start..start + len];
                    let stream = model
                        .stream_at(&Batch::single(tokens)?, self.first)?
                        .detach();
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
