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
    bm25: Arc<Bm25Index>,
    /// The dense store, with whether it is fused with BM25 (`None`: BM25 alone).
    dense: Option<(Arc<DenseIndex>, Fusion)>,
}

/// How the dense store's passages are used.
#[derive(Debug, Clone, Copy)]
enum Fusion {
    /// Alone.
    Alone,
    /// Fused with BM25's by weighted reciprocal rank fusion (weights of BM25 and dense).
    Hybrid([f32; 2]),
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
        let fusion = match source {
            PassageSource::Bm25 => None,
            PassageSource::Dense => Some(Fusion::Alone),
            PassageSource::Hybrid => Some(Fusion::Hybrid(weights)),
        };
        let dense = match fusion {
            None => None,
            Some(f) => Some((
                Arc::new(DenseIndex::open(bm25.clone(), Arc::new(encoder()?))?),
                f,
            )),
        };
        Ok(Passages { bm25, dense })
    }

    /// The BM25 index.
    pub fn bm25(&self) -> &Bm25Index {
        &self.bm25
    }

    /// The `k` best passages for `query`.
    pub fn search(&self, query: &str, k: usize) -> geek_retriever::Result<Vec<Passage>> {
        match &self.dense {
            None => self.bm25.search(query, k),
            Some((dense, Fusion::Alone)) => dense.search(query, k),
            Some((dense, Fusion::Hybrid(weights))) => {
                let lists = vec![self.bm25.search(query, k)?, dense.search(query, k)?];
                Ok(HybridRetriever::fuse_weighted(lists, weights, 60.0, k))
            }
        }
    }

    /// What keys evaluation runs apart: `None` for BM25 (as before dense existed), else the
    /// source, the encoder's sha256 and (hybrid) the weights.
    pub fn identity(&self) -> Option<String> {
        let (dense, fusion) = self.dense.as_ref()?;
        let sha = dense.encoder_sha256();
        Some(match fusion {
            Fusion::Alone => format!("dense:{sha}"),
            Fusion::Hybrid([a, b]) => format!("hybrid:{sha}@{a},{b}"),
        })
    }

    /// The agent's retriever.
    pub fn retriever(&self) -> Arc<dyn Retriever> {
        match &self.dense {
            None => self.bm25.clone(),
            Some((dense, Fusion::Alone)) => dense.clone(),
            Some((dense, Fusion::Hybrid(weights))) => Arc::new(
                HybridRetriever::new(vec![self.bm25.clone(), dense.clone()])
                    .with_weights(weights.to_vec()),
            ),
        }
    }
}
