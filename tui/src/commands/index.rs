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
use crate::passages::PassageSource;

pub fn build(
    corpora: Vec<PathBuf>,
    vital_only: bool,
    out: Option<PathBuf>,
    dense: bool,
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
    if dense {
        embed_index(&index, config)?;
    }
    Ok(())
}

/// `geek index embed`: the dense store of the index.
pub fn embed(config: &Resolved) -> Result<()> {
    embed_index(&Bm25Index::open(&config.index_dir)?, config)
}

fn embed_index(index: &Bm25Index, config: &Resolved) -> Result<()> {
    let encoder = crate::passages::encoder(&config.encoder, &config.models_dir)?;
    let start = Instant::now();
    let bar = crate::progress::steps_bar(index.meta().documents as u64);
    let mut first: Option<usize> = None;
    let dir = geek_retriever::dense::build(index, &encoder, &mut |p| {
        first.get_or_insert(p.done);
        bar.set_position(p.done as u64);
        let rate = (p.done - first.unwrap_or(0)) as f64 / start.elapsed().as_secs_f64();
        bar.set_message(format!("embedding passages, {rate:.1}/s"));
        if bar.is_hidden() && p.done % 2048 < geek_retriever::dense::BUILD_BATCH {
            eprintln!("{} of {} passages embedded", p.done, p.total);
        }
    });
    bar.finish_and_clear();
    let dir = dir?;
    let embedded = index.meta().documents - first.unwrap_or(0);
    println!(
        "embedded {embedded} passages into {} in {:.1} s ({:.1} passages/s; {} already done)",
        dir.display(),
        start.elapsed().as_secs_f64(),
        embedded as f64 / start.elapsed().as_secs_f64(),
        first.unwrap_or(0)
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
    let local = |source| -> Result<Vec<geek_retriever::Passage>> {
        Ok(config.open_passages(source)?.search(&args.query, args.k)?)
    };
    let hits = match args.source {
        SearchSource::Local => local(PassageSource::Bm25)?,
        SearchSource::Dense => local(PassageSource::Dense)?,
        SearchSource::Hybrid => local(PassageSource::Hybrid)?,
        // Asked directly, the web provider reports why it failed instead of giving nothing.
        SearchSource::Web => runtime.block_on(web(&args)?.search(&args.query, args.k))?,
        SearchSource::WebHybrid => {
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
        /// Also embed its passages for dense retrieval (see `embed`).
        #[arg(long)]
        dense: bool,
    },
    /// Embed the index's passages with the sentence encoder (`--encoder`) for dense and hybrid
    /// retrieval: batched, saved as it goes (rerun to resume), stored beside the index.
    Embed,
}

/// `geek search`
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Any text.
    pub query: String,
    /// How many passages.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Where to search: the local BM25 index, its dense store, both fused, a web provider, or
    /// BM25 and the web fused.
    #[arg(long, value_enum, default_value = "local")]
    pub source: SearchSource,
    /// Web provider for `--source web|web-hybrid`: mediawiki, searxng or kiwix.
    #[arg(long, default_value = "mediawiki")]
    pub web_provider: geek_retriever::WebProvider,
    /// Base URL of the web provider: a SearxNG instance, a MediaWiki api.php, or kiwix-serve's
    /// root (`http://127.0.0.1:8080`; add `?books.name=NAME` to search one book of several).
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
    /// The dense store beside it (`geek index embed` first).
    Dense,
    /// BM25 and dense, fused by weighted reciprocal rank fusion (`--hybrid-weights`).
    Hybrid,
    /// The web provider.
    Web,
    /// BM25 and the web provider, fused by reciprocal rank fusion.
    WebHybrid,
}
