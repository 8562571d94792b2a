//! The local BM25 index (tantivy).
//!
//! Passages are indexed with English stop-word removal and stemming. A passage is scored by
//! BM25 on its body — the title twice, then the text — plus BM25 on the title alone.
//! Queries are plain text: they are analysed with the same pipeline and turned into a
//! disjunction of term queries, so query-parser syntax in user text (quotes,
//! colons, `AND`, brackets) is just text and never an error.
//!
//! ```no_run
//! use geek_retriever::{Bm25Index, CorpusSource};
//!
//! let dir = std::path::Path::new("/tmp/geek-index");
//! let corpora = CorpusSource::defaults(std::path::Path::new("../shared/data"));
//! let index = Bm25Index::build(dir, &corpora, false)?;
//! for hit in index.search("How long is a llama pregnant?", 3)? {
//!     println!("{:.2} {} — {}", hit.score, hit.id, hit.title);
//! }
//! # Ok::<(), geek_retriever::Error>(())
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::corpus::{load_all, CorpusSource, Document};
use crate::{Error, Passage, Result};

/// Bumped whenever the schema or analysis changes; an index of another version is refused.
pub const SCHEMA_VERSION: u32 = 1;
const ANALYZER: &str = "geek_en";
const META_FILE: &str = "geek-index.json";
/// Weight of the separate title-field match, on top of the title's two copies in the body.
/// Chosen on StrategyQA dev (0.5, 1, 1.5, 2, 3 tried) and checked on the full train file.
pub const TITLE_BOOST: f32 = 1.0;

/// What an index records about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    /// [`SCHEMA_VERSION`] at build time.
    pub schema_version: u32,
    /// The corpora it was built from.
    pub corpora: Vec<CorpusSource>,
    /// Number of passages.
    pub documents: usize,
    /// Build time, seconds since the Unix epoch.
    pub built_at: u64,
}

struct Fields {
    id: Field,
    title: Field,
    section: Field,
    text: Field,
    /// Title twice, then text: what BM25 scores.
    body: Field,
}

/// A BM25 index over passages.
pub struct Bm25Index {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    meta: IndexMeta,
}

impl std::fmt::Debug for Bm25Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bm25Index")
            .field("dir", &self.dir)
            .field("documents", &self.meta.documents)
            .finish()
    }
}

fn analyzer() -> TextAnalyzer {
    let mut builder = TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .dynamic();
    if let Some(stop) = StopWordFilter::new(Language::English) {
        builder = builder.filter_dynamic(stop);
    }
    builder
        .filter_dynamic(Stemmer::new(Language::English))
        .build()
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let analyzed = TextFieldIndexing::default()
        .set_tokenizer(ANALYZER)
        .set_index_option(IndexRecordOption::WithFreqs);
    let indexed = TextOptions::default()
        .set_indexing_options(analyzed.clone())
        .set_stored();
    let fields = Fields {
        id: b.add_text_field("id", STRING | STORED),
        title: b.add_text_field("title", indexed.clone()),
        section: b.add_text_field("section", STORED),
        text: b.add_text_field("text", STORED),
        body: b.add_text_field(
            "body",
            TextOptions::default().set_indexing_options(analyzed),
        ),
    };
    (b.build(), fields)
}

/// The default index directory: `<user data dir>/geek/index`.
pub fn default_index_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "geek")
        .map(|d| d.data_dir().join("index"))
        .unwrap_or_else(|| PathBuf::from(".geek-index"))
}

impl Bm25Index {
    /// Builds an index of `corpora` in `dir`, replacing what is there.
    pub fn build(dir: &Path, corpora: &[CorpusSource], show_progress: bool) -> Result<Self> {
        let docs = load_all(corpora)?;
        Self::build_from_documents(dir, &docs, corpora.to_vec(), show_progress)
    }

    /// Builds an index of the given passages in `dir`, replacing what is there.
    pub fn build_from_documents(
        dir: &Path,
        docs: &[Document],
        corpora: Vec<CorpusSource>,
        show_progress: bool,
    ) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let (schema, f) = schema();
        let index = Index::create_in_dir(dir, schema)?;
        index.tokenizers().register(ANALYZER, analyzer());
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(4);
        let mut writer: IndexWriter = index.writer_with_num_threads(threads, 256 << 20)?;
        let bar = if show_progress {
            indicatif::ProgressBar::new(docs.len() as u64).with_style(
                indicatif::ProgressStyle::with_template("indexing {bar:40} {pos}/{len} passages")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            )
        } else {
            indicatif::ProgressBar::hidden()
        };
        for d in docs {
            let mut doc = TantivyDocument::default();
            doc.add_text(f.id, &d.id);
            doc.add_text(f.title, &d.title);
            doc.add_text(f.section, &d.section);
            doc.add_text(f.text, &d.text);
            doc.add_text(f.body, format!("{}\n{}\n{}", d.title, d.title, d.text));
            writer.add_document(doc)?;
            bar.inc(1);
        }
        writer.commit()?;
        writer.wait_merging_threads()?;
        bar.finish_and_clear();
        let meta = IndexMeta {
            schema_version: SCHEMA_VERSION,
            corpora,
            documents: docs.len(),
            built_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let meta_path = dir.join(META_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
        std::fs::write(&meta_path, json).map_err(|e| Error::io(&meta_path, e))?;
        Self::open(dir)
    }

    /// Opens an index built by [`build`](Self::build), refusing one of another schema version.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.is_file() {
            return Err(Error::IndexMissing(dir.to_path_buf()));
        }
        let bytes = std::fs::read(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let version: Version = serde_json::from_slice(&bytes).map_err(|e| Error::Corpus {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        if version.schema_version != SCHEMA_VERSION {
            return Err(Error::SchemaMismatch {
                path: dir.to_path_buf(),
                found: version.schema_version,
                expected: SCHEMA_VERSION,
            });
        }
        let meta: IndexMeta = serde_json::from_slice(&bytes).map_err(|e| Error::Corpus {
            path: meta_path,
            reason: e.to_string(),
        })?;
        let index = Index::open_in_dir(dir)?;
        index.tokenizers().register(ANALYZER, analyzer());
        let (_, fields) = schema();
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Bm25Index {
            dir: dir.to_path_buf(),
            index,
            reader,
            fields,
            meta,
        })
    }

    /// What the index records about itself.
    pub fn meta(&self) -> &IndexMeta {
        &self.meta
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The analysed terms of a text (lowercased, stop words removed, stemmed, deduplicated).
    pub fn analyze(&self, text: &str) -> Vec<String> {
        let mut analyzer = self
            .index
            .tokenizers()
            .get(ANALYZER)
            .unwrap_or_else(analyzer);
        let mut stream = analyzer.token_stream(text);
        let mut terms: Vec<String> = Vec::new();
        while let Some(tok) = stream.next() {
            if !terms.contains(&tok.text) {
                terms.push(tok.text.clone());
            }
        }
        terms
    }

    /// The passage with this id, if the index has it.
    pub fn get(&self, id: &str) -> Result<Option<Passage>> {
        let query = TermQuery::new(
            Term::from_field_text(self.fields.id, id),
            IndexRecordOption::Basic,
        );
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(1).order_by_score())?;
        top.into_iter()
            .next()
            .map(|(_, addr)| self.passage(&searcher, addr, 0.0))
            .transpose()
    }

    fn passage(
        &self,
        searcher: &tantivy::Searcher,
        addr: tantivy::DocAddress,
        score: f32,
    ) -> Result<Passage> {
        let doc: TantivyDocument = searcher.doc(addr)?;
        let get = |f: Field| {
            doc.get_first(f)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Ok(Passage {
            id: get(self.fields.id),
            title: get(self.fields.title),
            section: get(self.fields.section),
            text: get(self.fields.text),
            score,
            source: "bm25".into(),
        })
    }

    /// The `k` best passages for a plain-text query. A query with no searchable words gives
    /// no results.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        let terms = self.analyze(query);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for term in &terms {
            let body_q = TermQuery::new(
                Term::from_field_text(self.fields.body, term),
                IndexRecordOption::WithFreqs,
            );
            let title_q = TermQuery::new(
                Term::from_field_text(self.fields.title, term),
                IndexRecordOption::WithFreqs,
            );
            clauses.push((Occur::Should, Box::new(body_q)));
            clauses.push((
                Occur::Should,
                Box::new(BoostQuery::new(Box::new(title_q), TITLE_BOOST)),
            ));
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(k).order_by_score())?;
        top.into_iter()
            .map(|(score, addr)| self.passage(&searcher, addr, score))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, title: &str, text: &str) -> Document {
        Document {
            id: id.into(),
            title: title.into(),
            section: String::new(),
            text: text.into(),
        }
    }

    fn small_index(dir: &Path) -> Bm25Index {
        let docs = vec![
            doc("Llama-1", "Llama", "The llama is a domesticated South American camelid. Gestation lasts about 11.5 months."),
            doc("Vietnam War-1", "Vietnam War", "The Vietnam War lasted from 1955 to 1975."),
            doc("Paris-1", "Paris", "Paris is the capital and most populous city of France."),
        ];
        Bm25Index::build_from_documents(dir, &docs, vec![], false).unwrap()
    }

    #[test]
    fn finds_the_right_passage_with_stemming() {
        let dir = tempfile::tempdir().unwrap();
        let index = small_index(dir.path());
        let hits = index
            .search("How long do llamas stay pregnant (gestation)?", 2)
            .unwrap();
        assert_eq!(hits[0].id, "Llama-1");
        assert!(hits[0].score > 0.0);
        assert_eq!(
            index.search("wars in Vietnam", 1).unwrap()[0].id,
            "Vietnam War-1"
        );
    }

    #[test]
    fn any_text_is_a_valid_query() {
        let dir = tempfile::tempdir().unwrap();
        let index = small_index(dir.path());
        for q in [
            "\"unclosed",
            "title:Paris AND (",
            "+-*/:^~[]{}!",
            "",
            "the of and",
            "🦙 Paris?",
        ] {
            let hits = index.search(q, 3).unwrap();
            if q.contains("Paris") {
                assert_eq!(hits[0].id, "Paris-1", "{q}");
            }
        }
        assert!(index.search("the of and", 3).unwrap().is_empty());
    }

    #[test]
    fn title_matches_are_boosted() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![
            doc("a", "Camel", "An animal of the desert, unlike the llama."),
            doc("b", "Llama", "An animal of the Andes, unlike the camel."),
        ];
        let index = Bm25Index::build_from_documents(dir.path(), &docs, vec![], false).unwrap();
        assert_eq!(index.search("llama", 2).unwrap()[0].id, "b");
        assert_eq!(index.search("camel", 2).unwrap()[0].id, "a");
    }

    #[test]
    fn refuses_another_schema_version_and_missing_indexes() {
        let dir = tempfile::tempdir().unwrap();
        small_index(dir.path());
        let meta = dir.path().join(META_FILE);
        let text = std::fs::read_to_string(&meta).unwrap();
        std::fs::write(
            &meta,
            text.replace("\"schema_version\": 1", "\"schema_version\": 99"),
        )
        .unwrap();
        assert!(matches!(
            Bm25Index::open(dir.path()),
            Err(Error::SchemaMismatch { found: 99, .. })
        ));
        assert!(matches!(
            Bm25Index::open(&dir.path().join("nothing")),
            Err(Error::IndexMissing(_))
        ));
    }
}
