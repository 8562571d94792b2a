//! The embedded corpus of a BM25 index: every passage's unit-length embedding, stored beside
//! the index (`dense-ENCODER/`) with the encoder's sha256 and the index generation it embeds,
//! built in resumable batches; searched by exact cosine similarity.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Encoder;
use crate::{Bm25Index, BoxFuture, Error, Passage, Result, Retriever};

/// Passages encoded per batch (and per saved step of a build).
pub const BUILD_BATCH: usize = 32;

/// What a dense store records about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseMeta {
    /// sha256 of the encoder's weights.
    pub encoder_sha256: String,
    /// The BM25 index generation whose passages were embedded.
    pub index_data: Option<String>,
    /// Passages in all.
    pub documents: usize,
    /// Passages embedded so far (a build stopped early resumes here).
    pub done: usize,
    /// Embedding width.
    pub dim: usize,
}

/// Progress of a build: passages embedded so far, of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildProgress {
    /// Embedded.
    pub done: usize,
    /// In all.
    pub total: usize,
}

/// The directory of `encoder`'s store beside the BM25 index in `index_dir`.
pub fn store_dir(index_dir: &Path, encoder: &Encoder) -> PathBuf {
    let name = encoder
        .dir
        .file_name()
        .map_or("encoder".into(), |n| n.to_string_lossy().into_owned());
    index_dir.join(format!("dense-{name}"))
}

fn write_meta(dir: &Path, meta: &DenseMeta) -> Result<()> {
    let path = dir.join("meta.json");
    let tmp = dir.join("meta.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(meta).expect("meta serializes"),
    )
    .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

fn read_meta(dir: &Path) -> Result<Option<DenseMeta>> {
    let path = dir.join("meta.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Model {
                path,
                reason: format!("not a dense store's meta.json: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The text of a passage as it is embedded.
pub fn passage_text(title: &str, text: &str) -> String {
    format!("{title}. {text}")
}

/// Embeds every passage of `index` with `encoder` into its store (see [`store_dir`]), in
/// batches of [`BUILD_BATCH`], saved as they finish: a build that is stopped resumes after
/// the last saved batch; a store of another encoder or index generation is started over.
/// Passages are embedded shortest first (less padding per batch); the stored order is that
/// one, with their ids in `ids.json`.
pub fn build(
    index: &Bm25Index,
    encoder: &Encoder,
    progress: &mut dyn FnMut(BuildProgress),
) -> Result<PathBuf> {
    let dir = store_dir(index.dir(), encoder);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lock_path = dir.join(".build.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    let mut docs = index.passages()?;
    docs.sort_by(|a, b| {
        (a.title.len() + a.text.len(), &a.id).cmp(&(b.title.len() + b.text.len(), &b.id))
    });
    let fresh = DenseMeta {
        encoder_sha256: encoder.sha256.clone(),
        index_data: index.meta().data.clone(),
        documents: docs.len(),
        done: 0,
        dim: encoder.dim(),
    };
    let mut meta = match read_meta(&dir)? {
        Some(m)
            if DenseMeta {
                done: 0,
                ..m.clone()
            } == fresh =>
        {
            m
        }
        _ => {
            let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
            let path = dir.join("ids.json");
            std::fs::write(&path, serde_json::to_vec(&ids).expect("ids serialize"))
                .map_err(|e| Error::io(&path, e))?;
            fresh
        }
    };
    let path = dir.join("embeddings.f32");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    // Whatever follows the last saved batch is a batch cut short.
    let kept = (meta.done * meta.dim * 4) as u64;
    file.set_len(kept).map_err(|e| Error::io(&path, e))?;
    file.seek(std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(&path, e))?;
    progress(BuildProgress {
        done: meta.done,
        total: meta.documents,
    });
    while meta.done < docs.len() {
        let end = (meta.done + BUILD_BATCH).min(docs.len());
        let texts: Vec<String> = docs[meta.done..end]
            .iter()
            .map(|d| passage_text(&d.title, &d.text))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let rows: Vec<f32> = encoder.encode(&refs)?.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
        file.write_all(&bytes).map_err(|e| Error::io(&path, e))?;
        file.sync_data().map_err(|e| Error::io(&path, e))?;
        meta.done = end;
        write_meta(&dir, &meta)?;
        progress(BuildProgress {
            done: meta.done,
            total: meta.documents,
        });
    }
    Ok(dir)
}

/// A finished dense store, searchable: embeddings in memory, passages read from the BM25
/// index by id.
pub struct DenseIndex {
    encoder: Arc<Encoder>,
    index: Arc<Bm25Index>,
    ids: Vec<String>,
    /// `[n, dim]` unit rows.
    matrix: Tensor,
}

impl DenseIndex {
    /// Opens `encoder`'s store beside `index`. A missing, unfinished or stale store (another
    /// encoder, or an index rebuilt since) is an error that says to build it.
    pub fn open(index: Arc<Bm25Index>, encoder: Arc<Encoder>) -> Result<DenseIndex> {
        let dir = store_dir(index.dir(), &encoder);
        let stale = |reason: &str| Error::DenseStale {
            path: dir.clone(),
            reason: reason.to_string(),
        };
        let meta = read_meta(&dir)?.ok_or_else(|| stale("there is none"))?;
        if meta.encoder_sha256 != encoder.sha256 {
            return Err(stale("it was made by another encoder"));
        }
        if meta.index_data != index.meta().data {
            return Err(stale("the BM25 index was rebuilt since"));
        }
        if meta.done < meta.documents {
            return Err(stale(&format!(
                "it is unfinished ({} of {} passages)",
                meta.done, meta.documents
            )));
        }
        let ids_path = dir.join("ids.json");
        let bytes = std::fs::read(&ids_path).map_err(|e| Error::io(&ids_path, e))?;
        let ids: Vec<String> =
            serde_json::from_slice(&bytes).map_err(|_| stale("ids.json is damaged"))?;
        let path = dir.join("embeddings.f32");
        let mut raw = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(|e| Error::io(&path, e))?;
        if ids.len() != meta.documents || raw.len() != meta.documents * meta.dim * 4 {
            return Err(stale("its files disagree in size"));
        }
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let matrix = Tensor::from_vec(values, (meta.documents, meta.dim), &Device::Cpu)?;
        Ok(DenseIndex {
            encoder,
            index,
            ids,
            matrix,
        })
    }

    /// sha256 of the encoder's weights.
    pub fn encoder_sha256(&self) -> &str {
        &self.encoder.sha256
    }

    /// The `k` passages most similar to `query` (cosine), best first.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        let q = self.encoder.encode(&[query])?;
        let sims: Vec<f32> = self.matrix.matmul(&q.t()?)?.flatten_all()?.to_vec1()?;
        let mut order: Vec<usize> = (0..sims.len()).collect();
        let k = k.min(order.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        order.select_nth_unstable_by(k - 1, |&a, &b| sims[b].total_cmp(&sims[a]));
        order.truncate(k);
        order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
        let mut out = Vec::with_capacity(k);
        for i in order {
            if let Some(p) = self.index.get(&self.ids[i])? {
                out.push(Passage {
                    score: sims[i],
                    source: "dense".into(),
                    ..p
                });
            }
        }
        Ok(out)
    }
}

impl Retriever for DenseIndex {
    fn name(&self) -> String {
        "dense".into()
    }

    fn retrieve<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Passage>>> {
        // One query through a 6-layer encoder and a 19k × 384 product: milliseconds.
        Box::pin(async move { self.search(query, k) })
    }
}
