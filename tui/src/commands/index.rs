//! `geek index build` and `geek search`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use geek_retriever::{
    Bm25Index, CorpusSource, HybridRetriever, Retriever, WebConfig, WebProvider, WebRetriever,
};

use crate::cli::{SearchArgs, SearchSource, WebProviderArg};
use crate::config::Resolved;

pub fn build(
    corpora: Vec<PathBuf>,
    vital_only: bool,
    out: Option<PathBuf>,
    config: &Resolved,
) -> Result<()> {
    let sources = if corpora.is_empty() {
        let mut defaults = CorpusSource::defaults(config.require_data_dir()?);
        if vital_only {
            defaults.retain(|s| matches!(s, CorpusSource::WikiVital(_)));
        }
        defaults
    } else {
        corpora.into_iter().map(CorpusSource::from_path).collect()
    };
    let dir = out.unwrap_or_else(|| config.index_dir.clone());
    let start = Instant::now();
    let index = Bm25Index::build(&dir, &sources)?;
    println!(
        "indexed {} passages into {} in {:.1} s",
        index.meta().documents,
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn web(args: &SearchArgs) -> Result<WebRetriever> {
    let provider = match args.web_provider {
        WebProviderArg::Searxng => WebProvider::SearxNg,
        WebProviderArg::Mediawiki => WebProvider::MediaWiki,
    };
    let mut cfg = WebConfig::new(&args.web_url);
    cfg.cache_dir =
        directories::ProjectDirs::from("", "", "geek").map(|d| d.cache_dir().join("web"));
    Ok(WebRetriever::new(provider, cfg)?)
}

pub fn search(args: SearchArgs, config: &Resolved) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let hits = match args.source {
        SearchSource::Local => Bm25Index::open(&config.index_dir)?.search(&args.query, args.k)?,
        // Asked directly, the web provider reports why it failed instead of giving nothing.
        SearchSource::Web => runtime.block_on(web(&args)?.search(&args.query, args.k))?,
        SearchSource::Hybrid => {
            let hybrid = HybridRetriever::new(vec![
                Arc::new(Bm25Index::open(&config.index_dir)?),
                Arc::new(web(&args)?),
            ]);
            runtime.block_on(hybrid.retrieve(&args.query, args.k))?
        }
    };
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
            "{:>2}. [{:.3}] {} ({})\n    {preview}…",
            rank + 1,
            p.score,
            p.title,
            p.id
        );
    }
    Ok(())
}
