//! Web retrieval over HTTP: a SearxNG instance's JSON API, a MediaWiki site's search and
//! extracts API (Wikipedia's, or a mirror's), or kiwix-serve's full-text search over offline
//! ZIM files (Wikipedia kept offline).
//!
//! Every request has a connect and a total timeout, failed requests (connection errors,
//! timeouts, 5xx) are retried a bounded number of times with exponential backoff, bodies are
//! cut at a size limit, and answers are cached on disk keyed by provider, endpoint and query.
//! Through the [`Retriever`](crate::Retriever) trait a failure becomes "no results" with the
//! reason logged, so the agent keeps going; [`WebRetriever::search`] returns the typed error.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::html::html_to_text;
use crate::{BoxFuture, Error, Passage, Result, Retriever};

/// Which web API a [`WebRetriever`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebProvider {
    /// `GET {base}/search?q=…&format=json` of a SearxNG instance.
    SearxNg,
    /// `GET {base}?action=query&list=search…` then `prop=extracts` of a MediaWiki `api.php`.
    MediaWiki,
    /// `GET {base}/search?pattern=…&format=xml` of kiwix-serve, then each hit's article page
    /// (its lead is the passage). To search one book of several, the base URL carries
    /// `?books.name=NAME`.
    Kiwix,
}

impl WebProvider {
    /// `searxng`, `mediawiki` or `kiwix`.
    pub fn name(self) -> &'static str {
        match self {
            WebProvider::SearxNg => "searxng",
            WebProvider::MediaWiki => "mediawiki",
            WebProvider::Kiwix => "kiwix",
        }
    }
}

impl std::str::FromStr for WebProvider {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "searxng" => Ok(WebProvider::SearxNg),
            "mediawiki" => Ok(WebProvider::MediaWiki),
            "kiwix" => Ok(WebProvider::Kiwix),
            other => Err(format!(
                "web provider must be searxng, mediawiki or kiwix, not {other:?}"
            )),
        }
    }
}

/// Limits and endpoint of a web retriever.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Base URL: the SearxNG instance, the MediaWiki `api.php` URL, or kiwix-serve's root.
    pub base_url: String,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time for a whole request.
    pub timeout: Duration,
    /// Extra attempts after a failed one.
    pub retries: u32,
    /// First backoff; doubled on each retry.
    pub backoff: Duration,
    /// Largest response body accepted, in bytes.
    pub max_bytes: usize,
    /// Where answers are cached (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

impl WebConfig {
    /// Defaults: 3 s to connect, 10 s per request, 2 retries from 250 ms, 2 MiB bodies, no cache.
    pub fn new(base_url: impl Into<String>) -> Self {
        WebConfig {
            base_url: base_url.into(),
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(10),
            retries: 2,
            backoff: Duration::from_millis(250),
            max_bytes: 2 << 20,
            cache_dir: None,
        }
    }
}

/// A retriever that asks a web search API.
#[derive(Debug, Clone)]
pub struct WebRetriever {
    provider: WebProvider,
    config: WebConfig,
    client: reqwest::Client,
}

/// Redirects followed per request (all to the configured host).
const MAX_REDIRECTS: usize = 5;

/// Why one attempt failed, and whether trying again can help.
struct Attempt {
    reason: String,
    retry: bool,
}

impl WebRetriever {
    /// A retriever for `provider` with `config`.
    pub fn new(provider: WebProvider, config: WebConfig) -> Result<Self> {
        let host = reqwest::Url::parse(&config.base_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string));
        // Redirects stay on the configured host: a provider cannot send geek elsewhere.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if attempt.url().host_str() != host.as_deref() {
                let to = attempt.url().to_string();
                attempt.error(format!("redirect to another host ({to}) refused"))
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .redirect(redirects)
            .user_agent(concat!("geek/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Web {
                provider: provider.name().into(),
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(WebRetriever {
            provider,
            config,
            client,
        })
    }

    /// The `k` best results for `query`, or the reason there are none.
    pub async fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        let cache_path = self.cache_path(query, k);
        if let Some(path) = &cache_path {
            if let Ok(bytes) = std::fs::read(path) {
                if let Ok(hit) = serde_json::from_slice::<Vec<Passage>>(&bytes) {
                    return Ok(hit);
                }
            }
        }
        let passages = match self.provider {
            WebProvider::SearxNg => self.searxng(query, k).await?,
            WebProvider::MediaWiki => self.mediawiki(query, k).await?,
            WebProvider::Kiwix => self.kiwix(query, k).await?,
        };
        if let Some(path) = cache_path {
            let write = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    std::fs::write(&path, serde_json::to_vec(&passages).unwrap_or_default())
                });
            if let Err(e) = write {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the web cache");
            }
        }
        Ok(passages)
    }

    fn cache_path(&self, query: &str, k: usize) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        let mut h = Sha256::new();
        h.update(self.provider.name());
        h.update([0]);
        h.update(&self.config.base_url);
        h.update([0]);
        h.update(query);
        h.update(k.to_le_bytes());
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Some(dir.join(self.provider.name()).join(format!("{key}.json")))
    }

    fn error(&self, reason: String) -> Error {
        Error::Web {
            provider: self.provider.name().into(),
            reason,
        }
    }

    async fn searxng(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            results: Vec<Hit>,
        }
        #[derive(Deserialize)]
        struct Hit {
            url: String,
            #[serde(default)]
            title: String,
            #[serde(default)]
            content: String,
        }
        let url = format!("{}/search", self.config.base_url.trim_end_matches('/'));
        let answer: Answer = self
            .get_json(&url, &[("q", query), ("format", "json")])
            .await?;
        Ok(answer
            .results
            .into_iter()
            .take(k)
            .enumerate()
            .map(|(rank, h)| Passage {
                id: h.url,
                title: html_to_text(&h.title),
                section: String::new(),
                text: html_to_text(&h.content),
                score: 1.0 / (rank as f32 + 1.0),
                source: "searxng".into(),
            })
            .collect())
    }

    // Longer than 80 lines: two MediaWiki API calls (search, then extracts of the hits) and the parsing of both answers.
    async fn mediawiki(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        #[derive(Deserialize)]
        struct SearchAnswer {
            query: SearchQuery,
        }
        #[derive(Deserialize)]
        struct SearchQuery {
            #[serde(default)]
            search: Vec<SearchHit>,
        }
        #[derive(Deserialize)]
        struct SearchHit {
            title: String,
            pageid: u64,
            #[serde(default)]
            snippet: String,
        }
        #[derive(Deserialize)]
        struct ExtractAnswer {
            query: ExtractQuery,
        }
        #[derive(Deserialize)]
        struct ExtractQuery {
            #[serde(default)]
            pages: std::collections::HashMap<String, Page>,
        }
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            extract: String,
        }
        let limit = k.to_string();
        let found: SearchAnswer = self
            .get_json(
                &self.config.base_url,
                &[
                    ("action", "query"),
                    ("list", "search"),
                    ("srsearch", query),
                    ("srlimit", &limit),
                    ("format", "json"),
                ],
            )
            .await?;
        let hits: Vec<SearchHit> = found.query.search.into_iter().take(k).collect();
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let ids = hits
            .iter()
            .map(|h| h.pageid.to_string())
            .collect::<Vec<_>>()
            .join("|");
        // Extracts are a refinement: without them the search snippets still answer.
        let extracts = match self
            .get_json::<ExtractAnswer>(
                &self.config.base_url,
                &[
                    ("action", "query"),
                    ("prop", "extracts"),
                    ("exintro", "1"),
                    ("explaintext", "1"),
                    ("pageids", &ids),
                    ("format", "json"),
                ],
            )
            .await
        {
            Ok(a) => a.query.pages,
            Err(e) => {
                tracing::warn!(error = %e, "MediaWiki extracts failed; using search snippets");
                Default::default()
            }
        };
        Ok(hits
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                let text = extracts
                    .get(&h.pageid.to_string())
                    .map(|p| html_to_text(&p.extract))
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| html_to_text(&h.snippet));
                Passage {
                    id: format!("mediawiki:{}", h.title),
                    title: h.title,
                    section: String::new(),
                    text,
                    score: 1.0 / (rank as f32 + 1.0),
                    source: "mediawiki".into(),
                }
            })
            .collect())
    }

    async fn kiwix(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        let base = reqwest::Url::parse(&self.config.base_url).map_err(|e| {
            self.error(format!("bad kiwix-serve URL {}: {e}", self.config.base_url))
        })?;
        let mut search = base.clone();
        search.set_path(&format!("{}/search", base.path().trim_end_matches('/')));
        let limit = k.to_string();
        let body = self
            .get_bytes(
                search.as_str(),
                &[
                    ("pattern", query),
                    ("format", "xml"),
                    ("pageLength", &limit),
                ],
            )
            .await?;
        let hits = crate::kiwix::parse_results(&String::from_utf8_lossy(&body))
            .map_err(|e| self.error(format!("kiwix-serve search: {e}")))?;
        let pages = hits.iter().take(k).map(|h| async {
            // The article's lead is the passage; without the page the snippet still answers.
            let raw = crate::kiwix::raw_path(base.path(), &h.link);
            let page = match raw.as_deref().map(|p| base.join(p)) {
                Some(Ok(url)) => self.get_bytes(url.as_str(), &[]).await,
                _ => Err(self.error(format!("no raw page for the link {}", h.link))),
            };
            match page {
                Ok(html) => crate::kiwix::article_lead(&String::from_utf8_lossy(&html)),
                Err(e) => {
                    tracing::warn!(error = %e, "kiwix article page failed; using the snippet");
                    String::new()
                }
            }
        });
        let leads = futures::future::join_all(pages).await;
        Ok(hits
            .into_iter()
            .zip(leads)
            .enumerate()
            .map(|(rank, (h, lead))| Passage {
                id: format!("kiwix:{}", h.link),
                title: h.title,
                section: String::new(),
                text: if lead.is_empty() { h.snippet } else { lead },
                score: 1.0 / (rank as f32 + 1.0),
                source: "kiwix".into(),
            })
            .collect())
    }

    /// GET with retries; the body must be JSON of type `T` and fit in `max_bytes`.
    async fn get_json<T: DeserializeOwned>(&self, url: &str, query: &[(&str, &str)]) -> Result<T> {
        let body = self.get_bytes(url, query).await?;
        serde_json::from_slice(&body)
            .map_err(|e| self.error(format!("malformed JSON from {url}: {e}")))
    }

    /// GET with retries; the body must fit in `max_bytes`.
    async fn get_bytes(&self, url: &str, query: &[(&str, &str)]) -> Result<Vec<u8>> {
        let mut delay = self.config.backoff;
        let mut attempt = 0;
        loop {
            match self.get_once(url, query).await {
                Ok(body) => return Ok(body),
                Err(a) if a.retry && attempt < self.config.retries => {
                    tracing::debug!(reason = %a.reason, attempt, "retrying web request");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(a) => {
                    return Err(self.error(format!(
                        "{} (after {} attempts)",
                        a.reason,
                        attempt + 1
                    )))
                }
            }
        }
    }

    async fn get_once(
        &self,
        url: &str,
        query: &[(&str, &str)],
    ) -> std::result::Result<Vec<u8>, Attempt> {
        let timeout = self.config.timeout;
        let transient = |e: reqwest::Error| Attempt {
            retry: e.is_timeout() || e.is_connect() || (e.is_request() && !e.is_redirect()),
            reason: if e.is_timeout() {
                format!(
                    "request to {url} timed out after {:.1} s",
                    timeout.as_secs_f64()
                )
            } else {
                // reqwest's Display omits the cause ("error sending request"): show the chain.
                let mut reason = format!("request to {url} failed: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    reason.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                reason
            },
        };
        let mut response = self
            .client
            .get(url)
            .query(query)
            .send()
            .await
            .map_err(transient)?;
        let status = response.status();
        if !status.is_success() {
            return Err(Attempt {
                retry: status.is_server_error() || status.as_u16() == 429,
                reason: format!("{url} answered HTTP {status}"),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n as usize > self.config.max_bytes)
        {
            return Err(Attempt {
                retry: false,
                reason: format!("response larger than {} bytes", self.config.max_bytes),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transient)? {
            if body.len() + chunk.len() > self.config.max_bytes {
                return Err(Attempt {
                    retry: false,
                    reason: format!("response larger than {} bytes", self.config.max_bytes),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

impl Retriever for WebRetriever {
    fn name(&self) -> String {
        format!("web:{}", self.provider.name())
    }

    fn retrieve<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Passage>>> {
        Box::pin(async move {
            match self.search(query, k).await {
                Ok(p) => Ok(p),
                Err(e) => {
                    tracing::warn!(error = %e, "web retrieval failed; continuing without it");
                    Ok(Vec::new())
                }
            }
        })
    }
}
