//! # geek-retriever
//!
//! The agent's source of external knowledge: a tantivy BM25 index over Wikipedia passages and
//! web search, behind one `Retriever` trait. Not implemented yet.
#![warn(missing_docs)]
