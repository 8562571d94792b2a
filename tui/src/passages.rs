//! Where passages come from: the BM25 index, the dense store beside it, or both fused — one
//! choice (`--retriever`) for the agent, `geek search` and `geek eval retrieval`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use geek_backend::catalog;
use geek_retriever::dense::{DenseIndex, Encoder};
use geek_retriever::{Bm25Index, HybridRetriever, Passage, Retriever};

/// Which retriever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PassageSource {
    /// BM25 over the passage index.
    #[default]
    Bm25,
    /// Cosine similarity of sentence embeddings (`geek index embed` first).
    Dense,
    /// BM25 and dense fused by weighted reciprocal rank fusion.
    Hybrid,
}

/// The retrievers of one source, opened.
pub struct Passages {
    source: PassageSource,
    bm25: Arc<Bm25Index>,
    dense: Option<Arc<DenseIndex>>,
    /// RRF weights of BM25 and dense in `hybrid`.
    weights: [f32; 2],
}

/// The encoder named `spec`: a directory, or a catalogue encoder that has been pulled.
pub fn encoder(spec: &str, models_dir: &std::path::Path) -> Result<Encoder> {
    let as_dir = PathBuf::from(spec);
    let dir = if as_dir.is_dir() {
        as_dir
    } else {
        let entry = catalog::find_encoder(spec).with_context(|| {
            let known: Vec<&str> = catalog::ENCODERS.iter().map(|e| e.name).collect();
            format!(
                "no encoder {spec:?} (a directory, or one of {})",
                known.join(", ")
            )
        })?;
        let dir = catalog::encoder_dir(entry, models_dir);
        anyhow::ensure!(
            dir.join("model.safetensors").is_file(),
            "encoder {} is not in {}; run `geek model pull {}`",
            entry.name,
            dir.display(),
            entry.name
        );
        dir
    };
    Ok(Encoder::load(&dir)?)
}

impl Passages {
    /// Opens what `source` needs: the BM25 index of `index_dir` and, for dense and hybrid,
    /// the store `encoder` made beside it.
    pub fn open(
        source: PassageSource,
        index_dir: &std::path::Path,
        encoder: impl FnOnce() -> Result<Encoder>,
        weights: [f32; 2],
    ) -> Result<Passages> {
        let bm25 = Arc::new(Bm25Index::open(index_dir)?);
        let dense = match source {
            PassageSource::Bm25 => None,
            PassageSource::Dense | PassageSource::Hybrid => Some(Arc::new(DenseIndex::open(
                bm25.clone(),
                Arc::new(encoder()?),
            )?)),
        };
        Ok(Passages {
            source,
            bm25,
            dense,
            weights,
        })
    }

    /// The BM25 index.
    pub fn bm25(&self) -> &Bm25Index {
        &self.bm25
    }

    fn dense(&self) -> geek_retriever::Result<&DenseIndex> {
        Ok(self.dense.as_deref().expect("opened for dense retrieval"))
    }

    /// The `k` best passages for `query`.
    pub fn search(&self, query: &str, k: usize) -> geek_retriever::Result<Vec<Passage>> {
        match self.source {
            PassageSource::Bm25 => self.bm25.search(query, k),
            PassageSource::Dense => self.dense()?.search(query, k),
            PassageSource::Hybrid => {
                let lists = vec![self.bm25.search(query, k)?, self.dense()?.search(query, k)?];
                Ok(HybridRetriever::fuse_weighted(
                    lists,
                    &self.weights,
                    60.0,
                    k,
                ))
            }
        }
    }

    /// What keys evaluation runs apart: `None` for BM25 (as before dense existed), else the
    /// source, the encoder's sha256 and (hybrid) the weights.
    pub fn identity(&self) -> Option<String> {
        let sha = self
            .dense
            .as_ref()
            .map(|d| d.encoder_sha256().to_string())?;
        Some(match self.source {
            PassageSource::Hybrid => {
                format!("hybrid:{sha}@{},{}", self.weights[0], self.weights[1])
            }
            _ => format!("dense:{sha}"),
        })
    }

    /// The agent's retriever.
    pub fn retriever(&self) -> Arc<dyn Retriever> {
        match (self.source, &self.dense) {
            (PassageSource::Dense, Some(d)) => d.clone(),
            (PassageSource::Hybrid, Some(d)) => Arc::new(
                HybridRetriever::new(vec![self.bm25.clone(), d.clone()])
                    .with_weights(self.weights.to_vec()),
            ),
            _ => self.bm25.clone(),
        }
    }
}
