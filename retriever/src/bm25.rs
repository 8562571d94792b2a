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
//! let index = Bm25Index::build(dir, &corpora)?;
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
const BUILD_LOCK: &str = ".geek-index.lock";
const BUILDING_PREFIX: &str = ".building-";
const GENERATION_PREFIX: &str = "generation-";
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
    /// The subdirectory holding tantivy's files (absent: the directory itself, as indexes
    /// built before atomic rebuilds were laid out).
    #[serde(default)]
    pub data: Option<String>,
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

/// Refuses to build into an existing directory that holds something other than a geek index.
fn check_build_target(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
        Ok(m) if !m.is_dir() => return Err(Error::NotAnIndex(dir.to_path_buf())),
        Ok(_) => {}
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let empty = entries.next().is_none();
    if empty || dir.join(META_FILE).is_file() {
        Ok(())
    } else {
        Err(Error::NotAnIndex(dir.to_path_buf()))
    }
}

fn is_generation_name(name: &str) -> bool {
    name.strip_prefix(GENERATION_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes what earlier builds left in an index directory: killed builds, older generations
/// and (once a generation is current) the files of a pre-generation index. Only geek's own
/// names are touched.
fn remove_leftovers(dir: &Path, current: Option<&str>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let stale = name.starts_with(BUILDING_PREFIX)
            || (current.is_some() && is_generation_name(&name) && Some(name.as_str()) != current);
        let old_layout = current.is_some() && is_tantivy_file(&name);
        if stale && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        } else if old_layout && path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Files tantivy writes into an index directory.
fn is_tantivy_file(name: &str) -> bool {
    name == "meta.json"
        || name == ".managed.json"
        || name.starts_with(".tantivy-")
        || [
            ".idx",
            ".pos",
            ".term",
            ".store",
            ".fast",
            ".fieldnorm",
            ".del",
        ]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Writes the passages as a tantivy index into the (empty) directory `dir`.
fn write_tantivy(dir: &Path, docs: &[Document]) -> Result<()> {
    let (schema, f) = schema();
    let index = Index::create_in_dir(dir, schema)?;
    index.tokenizers().register(ANALYZER, analyzer());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let mut writer: IndexWriter = index.writer_with_num_threads(threads, 256 << 20)?;
    for d in docs {
        let mut doc = TantivyDocument::default();
        doc.add_text(f.id, &d.id);
        doc.add_text(f.title, &d.title);
        doc.add_text(f.section, &d.section);
        doc.add_text(f.text, &d.text);
        doc.add_text(f.body, format!("{}\n{}\n{}", d.title, d.title, d.text));
        writer.add_document(doc)?;
    }
    writer.commit()?;
    writer.wait_merging_threads()?;
    Ok(())
}

impl Bm25Index {
    /// Builds an index of `corpora` in `dir`, replacing the index that is there.
    ///
    /// `dir` must be missing, empty, or a geek index: any other directory is refused
    /// ([`Error::NotAnIndex`]), so a typo never deletes someone's files. The new index is
    /// built beside the old one and switched in by one atomic rename of its metadata file:
    /// a failed or killed build leaves the old index as it was.
    pub fn build(dir: &Path, corpora: &[CorpusSource]) -> Result<Self> {
        let docs = load_all(corpora)?;
        Self::build_from_documents(dir, &docs, corpora.to_vec())
    }

    /// Builds an index of the given passages in `dir` (see [`build`](Self::build)).
    pub fn build_from_documents(
        dir: &Path,
        docs: &[Document],
        corpora: Vec<CorpusSource>,
    ) -> Result<Self> {
        check_build_target(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // One build at a time per directory.
        let lock_path = dir.join(BUILD_LOCK);
        let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        remove_leftovers(dir, None)?;
        let building = tempfile::Builder::new()
            .prefix(BUILDING_PREFIX)
            .tempdir_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        write_tantivy(building.path(), docs)?;
        let generation = format!(
            "{GENERATION_PREFIX}{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let data_dir = dir.join(&generation);
        std::fs::rename(building.keep(), &data_dir).map_err(|e| Error::io(&data_dir, e))?;
        let meta = IndexMeta {
            schema_version: SCHEMA_VERSION,
            corpora,
            documents: docs.len(),
            built_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            data: Some(generation.clone()),
        };
        // The switch: until this rename the old metadata (and its data) is the index.
        let meta_path = dir.join(META_FILE);
        let tmp = dir.join(format!("{META_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
        std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &meta_path).map_err(|e| Error::io(&meta_path, e))?;
        remove_leftovers(dir, Some(&generation))?;
        drop(lock);
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
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        let data_dir = match &meta.data {
            Some(name) if is_generation_name(name) => dir.join(name),
            Some(name) => {
                return Err(Error::Corpus {
                    path: meta_path,
                    reason: format!("its data directory {name:?} is not an index generation"),
                })
            }
            // Indexes built before generations kept tantivy's files in the directory itself.
            None => dir.to_path_buf(),
        };
        let index = Index::open_in_dir(&data_dir)?;
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

    /// Every passage the index holds (id, title, section and text; score 0), in index order:
    /// what the index itself stored, so no corpus file is read again.
    pub fn passages(&self) -> Result<Vec<Passage>> {
        let searcher = self.reader.searcher();
        let mut out = Vec::with_capacity(searcher.num_docs() as usize);
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            for doc in segment.doc_ids_alive() {
                let addr = tantivy::DocAddress::new(ord as u32, doc);
                out.push(self.passage(&searcher, addr, 0.0)?);
            }
        }
        Ok(out)
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
        // tantivy allocates room for k hits up front: never ask for more than there are.
        let k = k.min(self.reader.searcher().num_docs() as usize);
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
        Bm25Index::build_from_documents(dir, &docs, vec![]).unwrap()
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
        let index = Bm25Index::build_from_documents(dir.path(), &docs, vec![]).unwrap();
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

    /// Regression: `geek index build --out DIR` deleted whatever DIR held.
    #[test]
    fn a_directory_with_other_files_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("thesis.txt");
        std::fs::write(&mine, "years of work").unwrap();
        let docs = vec![doc("a", "A", "alpha")];
        let err = Bm25Index::build_from_documents(dir.path(), &docs, vec![]).unwrap_err();
        assert!(matches!(err, Error::NotAnIndex(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&mine).unwrap(), "years of work");
        let file = dir.path().join("thesis.txt");
        assert!(matches!(
            Bm25Index::build_from_documents(&file, &docs, vec![]),
            Err(Error::NotAnIndex(_))
        ));
    }

    #[test]
    fn a_rebuild_replaces_the_index_and_a_killed_one_leaves_it_intact() {
        let dir = tempfile::tempdir().unwrap();
        let index_dir = dir.path().join("index");
        small_index(&index_dir);
        // A build killed before its switch leaves a half-written generation behind.
        std::fs::create_dir(index_dir.join(".building-x")).unwrap();
        std::fs::write(index_dir.join(".building-x").join("meta.json"), "{").unwrap();
        let still = Bm25Index::open(&index_dir).unwrap();
        assert_eq!(still.search("llama", 1).unwrap()[0].id, "Llama-1");
        drop(still);
        let rebuilt =
            Bm25Index::build_from_documents(&index_dir, &[doc("new", "Tapir", "tapirs")], vec![])
                .unwrap();
        assert_eq!(rebuilt.meta().documents, 1);
        assert_eq!(rebuilt.search("tapir", 5).unwrap()[0].id, "new");
        let names: Vec<String> = std::fs::read_dir(&index_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".geek-index.lock"))
            .collect();
        assert_eq!(names.len(), 2, "one generation and the metadata: {names:?}");
    }

    /// Regression: `geek search -k 18446744073709551615` overflowed tantivy's allocation.
    #[test]
    fn a_huge_k_is_clamped_to_the_document_count() {
        let dir = tempfile::tempdir().unwrap();
        let index = small_index(dir.path());
        assert_eq!(
            index.search("llama paris war", usize::MAX).unwrap().len(),
            3
        );
    }
}
