//! Web retrievers against a real HTTP server on 127.0.0.1 that serves recorded answers in each
//! provider's format, including slow, failing, malformed and oversized ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use geek_retriever::{
    Bm25Index, Document, Error, HybridRetriever, Retriever, WebConfig, WebProvider, WebRetriever,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the test server answers.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
    location: Option<String>,
}

fn ok(body: &str) -> Reply {
    Reply {
        status: 200,
        body: body.into(),
        delay: Duration::ZERO,
        location: None,
    }
}

/// Serves `route(path_and_query, request_number)` until the test ends; returns the base URL
/// and the request counter.
async fn serve<F>(route: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(&str, usize) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let route = Arc::new(route);
    let counter = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let route = route.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let reply = route(&target, n);
                tokio::time::sleep(reply.delay).await;
                let location = reply
                    .location
                    .map_or(String::new(), |l| format!("location: {l}\r\n"));
                let resp = format!(
                    "HTTP/1.1 {} X\r\ncontent-type: application/json\r\n{location}content-length: {}\r\nconnection: close\r\n\r\n{}",
                    reply.status,
                    reply.body.len(),
                    reply.body
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), count)
}

fn config(base: &str) -> WebConfig {
    WebConfig {
        timeout: Duration::from_millis(500),
        backoff: Duration::from_millis(10),
        ..WebConfig::new(base)
    }
}

const SEARXNG: &str = r#"{"query":"llama gestation","number_of_results":2,"results":[
 {"url":"https://example.org/llama","title":"Llama <b>facts</b>","content":"Gestation lasts &amp; about <em>11.5</em> months.","engine":"x","score":3.2},
 {"url":"https://example.org/alpaca","title":"Alpaca","content":"A smaller camelid.","engine":"x","score":1.0}]}"#;

#[tokio::test]
async fn searxng_results_become_plain_text_passages() {
    let (base, _) = serve(|path, _| {
        assert!(
            path.starts_with("/search?")
                && path.contains("format=json")
                && path.contains("q=llama"),
            "{path}"
        );
        ok(SEARXNG)
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    let hits = web.search("llama gestation", 5).await.unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].id, "https://example.org/llama");
    assert_eq!(hits[0].title, "Llama facts");
    assert_eq!(hits[0].text, "Gestation lasts & about 11.5 months.");
    assert_eq!(hits[0].source, "searxng");
    assert!(hits[0].score > hits[1].score);
    assert_eq!(web.search("llama gestation", 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn mediawiki_search_then_extracts() {
    let (base, count) = serve(|path, _| {
        if path.contains("list=search") {
            ok(r#"{"batchcomplete":"","query":{"searchinfo":{"totalhits":2},"search":[
              {"ns":0,"title":"Llama","pageid":18131,"snippet":"The <span class=\"searchmatch\">llama</span> is a camelid"},
              {"ns":0,"title":"Vietnam War","pageid":32611,"snippet":"war from 1955"}]}}"#)
        } else {
            assert!(path.contains("prop=extracts") && path.contains("pageids=18131%7C32611"), "{path}");
            ok(r#"{"batchcomplete":"","query":{"pages":{"18131":{"pageid":18131,"title":"Llama","extract":"The llama is a domesticated South American camelid."}}}}"#)
        }
    })
    .await;
    let web =
        WebRetriever::new(WebProvider::MediaWiki, config(&format!("{base}/w/api.php"))).unwrap();
    let hits = web.search("llama", 5).await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(hits[0].id, "mediawiki:Llama");
    assert_eq!(
        hits[0].text,
        "The llama is a domesticated South American camelid."
    );
    // No extract for the second page: its snippet, stripped, stands in.
    assert_eq!(hits[1].text, "war from 1955");
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let (base, count) = serve(|_, n| {
        if n < 2 {
            Reply {
                status: 503,
                ..ok("busy")
            }
        } else {
            ok(SEARXNG)
        }
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    assert_eq!(web.search("q", 3).await.unwrap().len(), 2);
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn failures_are_typed_and_bounded() {
    // Always 500: 1 try + 2 retries, then a typed error.
    let (base, count) = serve(|_, _| Reply {
        status: 500,
        ..ok("oops")
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    let err = web.search("q", 3).await.unwrap_err();
    assert!(
        matches!(&err, Error::Web { reason, .. } if reason.contains("500")),
        "{err}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // 404 is not retried.
    let (base, count) = serve(|_, _| Reply {
        status: 404,
        ..ok("no")
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    assert!(web.search("q", 3).await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // Malformed JSON.
    let (base, _) = serve(|_, _| ok("{\"results\": [")).await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    let err = web.search("q", 3).await.unwrap_err().to_string();
    assert!(err.contains("malformed JSON"), "{err}");

    // Too slow: the total timeout fires on every attempt, and the error says so.
    let (base, count) = serve(|_, _| Reply {
        delay: Duration::from_secs(3),
        ..ok(SEARXNG)
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    let started = std::time::Instant::now();
    let err = web.search("q", 3).await.unwrap_err().to_string();
    assert!(err.contains("timed out after 0.5 s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // Oversized body.
    let big = format!("{{\"results\":[],\"pad\":\"{}\"}}", "x".repeat(4096));
    let (base, _) = serve(move |_, _| ok(&big)).await;
    let web = WebRetriever::new(
        WebProvider::SearxNg,
        WebConfig {
            max_bytes: 1024,
            ..config(&base)
        },
    )
    .unwrap();
    let err = web.search("q", 3).await.unwrap_err().to_string();
    assert!(err.contains("larger than 1024"), "{err}");

    // Nobody listening: through the trait it degrades to no results.
    let web = WebRetriever::new(WebProvider::SearxNg, config("http://127.0.0.1:9")).unwrap();
    assert!(web.retrieve("q", 3).await.unwrap().is_empty());
}

#[tokio::test]
async fn answers_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (base, count) = serve(|_, _| ok(SEARXNG)).await;
    let cfg = WebConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..config(&base)
    };
    let web = WebRetriever::new(WebProvider::SearxNg, cfg.clone()).unwrap();
    let first = web.search("llama", 5).await.unwrap();
    let again = WebRetriever::new(WebProvider::SearxNg, cfg)
        .unwrap()
        .search("llama", 5)
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    web.search("alpaca", 5).await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn hybrid_fuses_local_and_web_and_survives_a_dead_web() {
    let dir = tempfile::tempdir().unwrap();
    let docs = vec![
        Document {
            id: "Llama-1".into(),
            title: "Llama".into(),
            section: String::new(),
            text: "Llama gestation lasts 11.5 months.".into(),
        },
        Document {
            id: "Paris-1".into(),
            title: "Paris".into(),
            section: String::new(),
            text: "Capital of France.".into(),
        },
    ];
    let local: Arc<dyn Retriever> =
        Arc::new(Bm25Index::build_from_documents(dir.path(), &docs, vec![]).unwrap());
    let (base, _) = serve(|_, _| ok(SEARXNG)).await;
    let web: Arc<dyn Retriever> =
        Arc::new(WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap());
    let hybrid = HybridRetriever::new(vec![local.clone(), web]);
    let hits = hybrid.retrieve("llama gestation", 5).await.unwrap();
    let ids: Vec<&str> = hits.iter().map(|p| p.id.as_str()).collect();
    assert!(
        ids.contains(&"Llama-1") && ids.contains(&"https://example.org/llama"),
        "{ids:?}"
    );

    let dead: Arc<dyn Retriever> =
        Arc::new(WebRetriever::new(WebProvider::SearxNg, config("http://127.0.0.1:9")).unwrap());
    let hits = HybridRetriever::new(vec![local, dead])
        .retrieve("llama gestation", 5)
        .await
        .unwrap();
    assert_eq!(hits[0].id, "Llama-1");
}

/// Regression: reqwest followed up to 10 redirects to any host.
#[tokio::test]
async fn redirects_to_another_host_are_refused() {
    let (elsewhere, visits) = serve(|_, _| ok(SEARXNG)).await;
    let port = elsewhere.rsplit(':').next().unwrap().to_string();
    let target = format!("http://localhost:{port}/search");
    let (base, _) = serve(move |path, _| {
        if path.starts_with("/search") {
            Reply {
                status: 302,
                location: Some(target.clone()),
                ..ok("")
            }
        } else {
            ok(SEARXNG)
        }
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    let err = web.search("q", 3).await.unwrap_err().to_string();
    assert!(err.contains("another host"), "{err}");
    assert_eq!(visits.load(Ordering::SeqCst), 0);

    // A redirect on the same host is followed.
    let (base, _) = serve(|path, _| {
        if path.starts_with("/search") {
            Reply {
                status: 302,
                location: Some("/moved".into()),
                ..ok("")
            }
        } else {
            ok(SEARXNG)
        }
    })
    .await;
    let web = WebRetriever::new(WebProvider::SearxNg, config(&base)).unwrap();
    assert_eq!(web.search("q", 3).await.unwrap().len(), 2);
}

/// Regression: MediaWiki extracts were used without stripping HTML (and so without losing any
/// markup a hostile server put there).
#[tokio::test]
async fn mediawiki_extracts_are_stripped() {
    let (base, _) = serve(|path, _| {
        if path.contains("list=search") {
            ok(r#"{"query":{"search":[{"title":"Llama","pageid":1,"snippet":"s"}]}}"#)
        } else {
            ok(r#"{"query":{"pages":{"1":{"extract":"<p>The <b>llama</b></p><script>alert(1)</script> is tall &amp; woolly."}}}}"#)
        }
    })
    .await;
    let web = WebRetriever::new(WebProvider::MediaWiki, config(&base)).unwrap();
    let hits = web.search("llama", 1).await.unwrap();
    assert_eq!(hits[0].text, "The llama is tall & woolly.");
}
