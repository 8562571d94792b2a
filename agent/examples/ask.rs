//! Ask one question with the default model and a BM25 index of the default corpus.
//!
//! ```sh
//! cargo run --release -p geek-agent --example ask -- "Could a llama give birth twice during the Vietnam War?"
//! ```
//!
//! Needs the default model (`geek model pull`) and the data in `../shared/data`
//! (or `GEEK_DATA_DIR`).

use geek_agent::{Event, Excavator};
use geek_backend::{catalog, Engine, EngineConfig};
use geek_retriever::{Bm25Index, CorpusSource};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Could a llama give birth twice during the Vietnam War?".into());

    // 1. The model: the catalogue's default, fetched by `geek model pull`.
    let model = catalog::resolve(
        catalog::default_model().name,
        &geek_backend::paths::models_dir(None),
    )?;
    let engine = Engine::load(EngineConfig::new(model).with_threads(2))?;

    // 2. The knowledge: a BM25 index of StrategyQA paragraphs and vital articles (~1 s to build).
    let index_dir = std::env::temp_dir().join("geek-example-index");
    let index = match Bm25Index::open(&index_dir) {
        Ok(index) => index,
        Err(_) => {
            let data = geek_backend::paths::data_dir(None);
            Bm25Index::build(&index_dir, &CorpusSource::defaults(&data))?
        }
    };

    // 3. The agent, streaming what it does.
    let agent = Excavator::builder()
        .backend(engine)
        .retriever(index)
        .build()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            match event {
                Event::SubQuestion { text, .. } => println!("Q: {text}"),
                Event::FactExtracted {
                    fact, citations, ..
                } => println!("   A: {fact} {citations:?}"),
                _ => {}
            }
        }
    });
    let trace = agent.run_streaming(&question, tx).await?;
    printer.await?;
    println!("{question} -> {}", if trace.answer { "yes" } else { "no" });
    Ok(())
}
