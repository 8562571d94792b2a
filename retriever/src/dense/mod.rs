//! Dense retrieval: passages and queries embedded by a sentence-transformers BERT encoder
//! (all-MiniLM-L6-v2 by default), compared by cosine similarity.

mod bert;
mod store;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use bert::{forward_with, mean_pool_normalized, Bert, BertConfig};
pub use store::{
    build, passage_text, store_dir, BuildProgress, DenseIndex, DenseMeta, BUILD_BATCH,
};

use crate::{Error, Result};

/// Tokens an input is cut to (sentence-transformers' `max_seq_length` of the MiniLM models).
pub const MAX_TOKENS: usize = 256;

/// A sentence encoder: BERT, its WordPiece tokenizer, mean pooling and L2 normalisation.
pub struct Encoder {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    /// Where it was loaded from.
    pub dir: PathBuf,
    /// sha256 of its `model.safetensors` (stored beside an embedded corpus, so a store made
    /// by another encoder is refused).
    pub sha256: String,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("dir", &self.dir)
            .field("config", &self.bert.config)
            .finish()
    }
}

impl Encoder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Encoder> {
        let bert = Bert::load(dir)?;
        Encoder::with_bert(dir, bert)
    }

    /// The encoder of `dir` (its tokenizer, its identity) running `bert` — a compressed
    /// student of the same vocabulary, say.
    pub fn with_bert(dir: &Path, bert: Bert) -> Result<Encoder> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Model {
            path: path.clone(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| Error::Model {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
        let sha256 =
            sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes));
        Ok(Encoder {
            bert,
            tokenizer,
            sha256: sha256.iter().map(|b| format!("{b:02x}")).collect(),
            dir: dir.to_path_buf(),
        })
    }

    /// The BERT model.
    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// Token ids and attention mask `[b, t]` of `texts`, padded to the longest.
    pub fn batch(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Model {
                path: self.dir.clone(),
                reason: format!("tokenizing: {e}"),
            })?;
        let t = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; texts.len() * t];
        let mut mask = vec![0f32; texts.len() * t];
        for (i, e) in encodings.iter().enumerate() {
            for (j, &id) in e.get_ids().iter().enumerate() {
                ids[i * t + j] = id;
                mask[i * t + j] = 1.0;
            }
        }
        let shape = (texts.len(), t);
        Ok((
            Tensor::from_vec(ids, shape, &Device::Cpu)?,
            Tensor::from_vec(mask, shape, &Device::Cpu)?,
        ))
    }

    /// Unit-length embeddings `[n, dim]` of `texts`, computed in one batch.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.dim()),
                candle_core::DType::F32,
                &Device::Cpu,
            )?);
        }
        let (ids, mask) = self.batch(texts)?;
        let hidden = self.bert.forward(&ids, &mask)?;
        Ok(mean_pool_normalized(&hidden, &mask)?)
    }
}
