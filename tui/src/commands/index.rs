//! `geek index build` and `geek search`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use geek_retriever::{Bm25Index, CorpusSource};

use crate::cli::SearchArgs;
use crate::config::Resolved;

pub fn build(corpora: Vec<PathBuf>, out: Option<PathBuf>, config: &Resolved) -> Result<()> {
    let sources = if corpora.is_empty() {
        CorpusSource::defaults(&config.data_dir)
    } else {
        corpora.into_iter().map(CorpusSource::from_path).collect()
    };
    let dir = out.unwrap_or_else(|| config.index_dir.clone());
    let start = Instant::now();
    let index = Bm25Index::build(&dir, &sources, std::io::stderr().is_terminal())?;
    println!(
        "indexed {} passages into {} in {:.1} s",
        index.meta().documents,
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn search(args: SearchArgs, config: &Resolved) -> Result<()> {
    let index = Bm25Index::open(&config.index_dir)?;
    let hits = index.search(&args.query, args.k)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("no passages match (the query has no searchable words, or none occur)");
    }
    for (rank, p) in hits.iter().enumerate() {
        let preview: String = p.text.chars().take(160).collect();
        println!(
            "{:>2}. [{:.2}] {} ({})\n    {preview}…",
            rank + 1,
            p.score,
            p.title,
            p.id
        );
    }
    Ok(())
}
