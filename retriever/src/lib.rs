//! # geek-retriever
//!
//! The agent's source of external knowledge, behind one [`Retriever`] trait:
//! - [`Bm25Index`]: a local tantivy BM25 index over Wikipedia passages (by default the
//!   StrategyQA paragraphs plus the vital-article summaries, ~19k passages);
//! - [`WebRetriever`]: a SearxNG instance or a MediaWiki site over HTTP, with timeouts,
//!   bounded retries, a size limit and an on-disk cache;
//! - [`HybridRetriever`]: several of them fused by reciprocal rank fusion.
//!
//! Retrieved text is data: it is shown to the model as passages, never executed or followed
//! as an instruction.
#![warn(missing_docs)]

mod bm25;
pub mod corpus;
pub mod dense;
mod error;
mod html;
mod hybrid;
mod kiwix;
mod web;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use bm25::{Bm25Index, IndexMeta, SCHEMA_VERSION, TITLE_BOOST};
pub use corpus::{CorpusSource, Document};
pub use error::{Error, Result};
pub use html::html_to_text;
pub use hybrid::HybridRetriever;
pub use web::{WebConfig, WebProvider, WebRetriever};

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    /// Stable id (`"Title-N"` for StrategyQA paragraphs; the URL for web results).
    pub id: String,
    /// Article or page title.
    pub title: String,
    /// Section heading, when known.
    pub section: String,
    /// Plain text.
    pub text: String,
    /// Retriever score (BM25, or fused rank score); higher is better.
    pub score: f32,
    /// Which retriever produced it (`bm25`, `searxng`, `mediawiki`, `hybrid`).
    pub source: String,
}

/// A boxed, sendable future, so that [`Retriever`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Anything that turns a query into ranked passages.
pub trait Retriever: Send + Sync {
    /// A short name for traces (`bm25`, `web:searxng`, …).
    fn name(&self) -> String;

    /// The `k` best passages for `query`, best first.
    fn retrieve<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Passage>>>;
}

impl Retriever for Bm25Index {
    fn name(&self) -> String {
        "bm25".into()
    }

    fn retrieve<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Passage>>> {
        // Searching the local index takes well under a millisecond: no need to leave the task.
        Box::pin(async move { self.search(query, k) })
    }
}

impl<R: Retriever + ?Sized> Retriever for Arc<R> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn retrieve<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Passage>>> {
        (**self).retrieve(query, k)
    }
}
