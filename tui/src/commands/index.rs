//! `geek index build` and `geek search`.

use clap::{Args, Subcommand};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use geek_retriever::{
    Bm25Index, CorpusSource, HybridRetriever, Retriever, WebConfig, WebRetriever,
};

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
    let provider = args.web_provider;
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

/// `geek index …`
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Build (or rebuild) the index from passage corpora.
    Build {
        /// Corpus files: the StrategyQA paragraphs JSON, the vital-article summaries JSON, or
        /// JSONL `{id, title, section?, text}` (default: the first two from the data directory).
        #[arg(long = "corpus")]
        corpora: Vec<PathBuf>,
        /// Of the default corpus, only the vital-article summaries: no StrategyQA evidence
        /// paragraphs (the setting of a user without oracle passages).
        #[arg(long, conflicts_with = "corpora")]
        vital_only: bool,
        /// Where to write the index (default: --index).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `geek search`
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Any text.
    pub query: String,
    /// How many passages.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Where to search: the local index, a web provider, or both fused.
    #[arg(long, value_enum, default_value = "local")]
    pub source: SearchSource,
    /// Web provider for `--source web|hybrid`.
    #[arg(long, default_value = "mediawiki")]
    pub web_provider: geek_retriever::WebProvider,
    /// Base URL of the web provider: a SearxNG instance, or a MediaWiki api.php.
    #[arg(
        long,
        env = "GEEK_WEB_URL",
        default_value = "https://en.wikipedia.org/w/api.php"
    )]
    pub web_url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--source`
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SearchSource {
    /// The BM25 index.
    Local,
    /// The web provider.
    Web,
    /// Both, fused by reciprocal rank fusion.
    Hybrid,
}
