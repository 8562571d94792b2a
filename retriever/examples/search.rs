//! Build a BM25 index, search it, and fuse it with a second retriever.
//!
//! ```sh
//! cargo run --release -p geek-retriever --example search -- "How long is a llama pregnant?"
//! ```
//!
//! Indexes a handful of passages of its own; `geek index build` indexes the 19,284 of the
//! default corpus the same way.

use std::sync::Arc;

use geek_retriever::{Bm25Index, Document, HybridRetriever, Retriever};

fn passage(id: &str, title: &str, text: &str) -> Document {
    Document {
        id: id.into(),
        title: title.into(),
        section: String::new(),
        text: text.into(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let query = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "How long is a llama pregnant?".into());

    // 1. Build: passages analysed with English stemming and stop words; the title counts twice.
    let dir = tempfile::tempdir()?;
    let index = Bm25Index::build_from_documents(
        dir.path(),
        &[
            passage(
                "Llama-1",
                "Llama",
                "The gestation period of a llama is 11.5 months.",
            ),
            passage(
                "Alpaca-1",
                "Alpaca",
                "Alpacas are kept in herds in the Andes.",
            ),
            passage(
                "Vietnam War-1",
                "Vietnam War",
                "The war lasted from 1955 to 1975.",
            ),
        ],
        vec![],
    )?;

    // 2. Search: any text is a valid query (operators and quotes are just words).
    for hit in index.search(&query, 2)? {
        println!("{:6.2}  {}  {}", hit.score, hit.id, hit.text);
    }

    // 3. Fuse: reciprocal rank fusion of several retrievers (here the index with itself; in
    //    geek, the index with a web provider).
    let index: Arc<dyn Retriever> = Arc::new(index);
    let hybrid = HybridRetriever::new(vec![index.clone(), index]);
    let fused = hybrid.retrieve(&query, 2).await?;
    println!(
        "fused: {:?}",
        fused.iter().map(|p| &p.id).collect::<Vec<_>>()
    );
    Ok(())
}
