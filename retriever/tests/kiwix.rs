//! The kiwix provider against a real kiwix-serve (Debian's kiwix-tools) on 127.0.0.1, serving
//! a ZIM that zim-tools' zimwriterfs builds from StrategyQA paragraphs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geek_retriever::{
    Bm25Index, Document, HybridRetriever, Retriever, WebConfig, WebProvider, WebRetriever,
};

fn data_dir() -> PathBuf {
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    std::env::var_os("GEEK_DATA_DIR").map_or(default, PathBuf::from)
}

/// `n` paragraphs of the StrategyQA corpus with distinct titles, as documents.
fn paragraphs(n: usize) -> Vec<Document> {
    let path = data_dir().join("strategyqa/strategyqa_train_paragraphs.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut docs = Vec::new();
    for (id, p) in all {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        let text = p["content"].as_str().unwrap_or_default().to_string();
        let plain = title.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ');
        if plain && text.len() > 200 && seen.insert(title.clone()) {
            docs.push(Document {
                id,
                title,
                section: String::new(),
                text,
            });
        }
        if docs.len() == n {
            break;
        }
    }
    docs
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A 48×48 PNG (zimwriterfs requires an illustration of that size).
fn png_48() -> Vec<u8> {
    let crc = |data: &[u8]| {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    let chunk = |kind: &[u8], data: &[u8], out: &mut Vec<u8>| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc(&body).to_be_bytes());
    };
    // Uncompressed deflate ("stored" blocks) of 48 grey rows, each a filter byte and 48 RGB.
    let raw: Vec<u8> = (0..48)
        .flat_map(|_| std::iter::once(0u8).chain(std::iter::repeat_n(0x80, 144)))
        .collect();
    let mut z = vec![0x78, 0x01];
    for (i, block) in raw.chunks(65535).enumerate() {
        let last = (i + 1) * 65535 >= raw.len();
        z.push(last as u8);
        z.extend((block.len() as u16).to_le_bytes());
        z.extend((!(block.len() as u16)).to_le_bytes());
        z.extend(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend(((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(48u32.to_be_bytes());
    ihdr.extend(48u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr, &mut png);
    chunk(b"IDAT", &z, &mut png);
    chunk(b"IEND", &[], &mut png);
    png
}

/// Builds `dir/corpus.zim` from `docs` with zimwriterfs: one article per document.
fn build_zim(dir: &Path, docs: &[Document]) -> PathBuf {
    let src = dir.join("html");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("favicon.png"), png_48()).unwrap();
    let mut index = String::from("<html><head><title>Corpus</title></head><body>");
    for (i, d) in docs.iter().enumerate() {
        let page = format!(
            "<html><head><title>{t}</title></head><body><h1>{t}</h1><p>{x}</p>\
             <h2>See also</h2><p>Unrelated trailing section.</p></body></html>",
            t = escape(&d.title),
            x = escape(&d.text)
        );
        std::fs::write(src.join(format!("a{i}.html")), page).unwrap();
        index.push_str(&format!("<a href=\"a{i}.html\">{}</a>", escape(&d.title)));
    }
    index.push_str("</body></html>");
    std::fs::write(src.join("index.html"), index).unwrap();
    let zim = dir.join("corpus.zim");
    let status = Command::new("zimwriterfs")
        .args([
            "--welcome=index.html",
            "--illustration=favicon.png",
            "--language=eng",
            "--title=geek test corpus",
            "--description=StrategyQA paragraphs",
            "--creator=geek",
            "--publisher=geek",
            "--name=geek_test_corpus",
        ])
        .arg(&src)
        .arg(&zim)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("zimwriterfs (Debian's zim-tools) must be installed: scripts/install-deps.sh");
    assert!(status.success(), "zimwriterfs failed");
    zim
}

/// kiwix-serve on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(zim: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("kiwix-serve")
        .args(["--address", "127.0.0.1", "--port", &port.to_string()])
        .arg(zim)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiwix-serve (Debian's kiwix-tools) must be installed: scripts/install-deps.sh");
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "kiwix-serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn kiwix(base: &str) -> WebRetriever {
    WebRetriever::new(WebProvider::Kiwix, WebConfig::new(base)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiwix_serve_finds_corpus_articles_alone_and_in_hybrid_fusion() {
    let dir = tempfile::tempdir().unwrap();
    let docs = paragraphs(30);
    assert_eq!(docs.len(), 30);
    let zim = build_zim(dir.path(), &docs);
    let server = serve(&zim);

    // Every article found by its title, with its lead (not the later section) as the text.
    let retriever = kiwix(&server.base);
    let mut top1 = 0;
    for d in &docs {
        let hits = retriever.search(&d.title, 5).await.unwrap();
        assert!(!hits.is_empty(), "nothing for {:?}", d.title);
        let found = hits.iter().find(|h| h.title == d.title);
        let hit = found.unwrap_or_else(|| panic!("{:?} not in {hits:?}", d.title));
        let opening: Vec<&str> = d.text.split_whitespace().take(6).collect();
        assert!(hit.text.contains(&opening.join(" ")), "{:?}", hit.text);
        assert!(!hit.text.contains("Unrelated trailing section"));
        assert!(
            hit.text.starts_with(&d.title),
            "the taskbar is not text: {:?}",
            hit.text
        );
        assert_eq!(hit.source, "kiwix");
        top1 += (hits[0].title == d.title) as usize;
    }
    assert!(
        top1 >= 20,
        "only {top1}/30 titles ranked their own article first"
    );

    // One book of several is chosen by name in the URL; an unknown one is a typed error.
    let named = kiwix(&format!("{}/?books.name=corpus", server.base));
    assert!(!named.search(&docs[0].title, 3).await.unwrap().is_empty());
    let wrong = kiwix(&format!("{}/?books.name=nope", server.base));
    let err = wrong.search(&docs[0].title, 3).await.unwrap_err();
    assert!(err.to_string().contains("kiwix"), "{err}");

    // Fused with a local BM25 index of other passages, both sides contribute.
    let other = vec![Document {
        id: "Local-1".into(),
        title: "Local note".into(),
        section: String::new(),
        text: format!("{} is also described in a local note.", docs[1].title),
    }];
    let local: Arc<dyn Retriever> =
        Arc::new(Bm25Index::build_from_documents(&dir.path().join("idx"), &other, vec![]).unwrap());
    let hybrid = HybridRetriever::new(vec![local, Arc::new(kiwix(&server.base))]);
    let hits = hybrid.retrieve(&docs[1].title, 5).await.unwrap();
    assert!(hits.iter().any(|h| h.id == "Local-1"), "{hits:?}");
    assert!(
        hits.iter()
            .any(|h| h.title == docs[1].title && h.id.starts_with("kiwix:")),
        "{hits:?}"
    );

    // The server gone, the provider says why (and the trait keeps the agent going).
    let base = server.base.clone();
    drop(server);
    assert!(kiwix(&base).search("anything", 3).await.is_err());
    assert!(kiwix(&base)
        .retrieve("anything", 3)
        .await
        .unwrap()
        .is_empty());
}
