//! kiwix-serve's full-text search (Kiwix keeps Wikipedia offline as ZIM files): the search
//! answer's RSS items, and the lead of an article page.

use crate::html::html_to_text;

/// One search result: the article's title, its path on the server, and the snippet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KiwixHit {
    pub(crate) title: String,
    pub(crate) link: String,
    pub(crate) snippet: String,
}

/// The text between `<tag>` and `</tag>` in `xml`, from `from`; and where it ends.
fn element<'a>(xml: &'a str, tag: &str, from: usize) -> Option<(&'a str, usize)> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml[from..].find(&open)? + from + open.len();
    let end = xml[start..].find(&close)? + start;
    Some((&xml[start..end], end + close.len()))
}

/// The items of kiwix-serve's `/search?format=xml` answer (OpenSearch RSS), or what the
/// server said was wrong.
pub(crate) fn parse_results(xml: &str) -> Result<Vec<KiwixHit>, String> {
    if let Some((error, _)) = element(xml, "error", 0) {
        let detail: Vec<String> = xml
            .match_indices("<detail>")
            .filter_map(|(i, _)| element(xml, "detail", i).map(|(d, _)| html_to_text(d)))
            .collect();
        return Err(format!("{}: {}", html_to_text(error), detail.join("; ")));
    }
    if !xml.contains("<rss") {
        return Err("not an OpenSearch RSS answer (is this a kiwix-serve URL?)".into());
    }
    let mut hits = Vec::new();
    let mut at = 0;
    while let Some((item, end)) = element(xml, "item", at) {
        at = end;
        let text = |tag| element(item, tag, 0).map_or(String::new(), |(t, _)| html_to_text(t));
        let link = element(item, "link", 0).map_or(String::new(), |(t, _)| t.trim().to_string());
        if link.is_empty() {
            continue;
        }
        hits.push(KiwixHit {
            title: text("title"),
            link: crate::html::decode_entities(&link),
            snippet: text("description"),
        });
    }
    Ok(hits)
}

/// The path of an article's raw page (without the taskbar kiwix-serve injects) for a search
/// result's `link`, on a server rooted at `root` (`/`, or its `--urlRootLocation`). Links are
/// `{root}/{book}/{path}` (kiwix-serve 3.3) or `{root}/content/{book}/{path}` (later ones);
/// the raw page is `{root}/raw/{book}/content/{path}`.
pub(crate) fn raw_path(root: &str, link: &str) -> Option<String> {
    let root = root.trim_end_matches('/');
    let rest = link.strip_prefix(root)?.trim_start_matches('/');
    let rest = rest.strip_prefix("content/").unwrap_or(rest);
    let (book, path) = rest.split_once('/')?;
    (!book.is_empty() && !path.is_empty()).then(|| format!("{root}/raw/{book}/content/{path}"))
}

/// Characters of an article kept as one passage.
pub(crate) const LEAD_CHARS: usize = 1500;

/// The lead of an article page: its text before the first second-level heading (Wikipedia's
/// introduction), cut at a sentence end within [`LEAD_CHARS`].
pub(crate) fn article_lead(html: &str) -> String {
    let body = crate::html::find_ignoring_ascii_case(html, "<body").map_or(html, |i| &html[i..]);
    let lead = crate::html::find_ignoring_ascii_case(body, "<h2").map_or(body, |i| &body[..i]);
    let text = html_to_text(lead);
    if text.chars().count() <= LEAD_CHARS {
        return text;
    }
    let cut: String = text.chars().take(LEAD_CHARS).collect();
    match cut.rfind(". ") {
        Some(i) if i > LEAD_CHARS / 3 => cut[..=i].to_string(),
        _ => cut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_of_a_search_answer_are_read() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Search: llama</title>
<item><title>Llama</title><link>/wiki/A/Llama?x=1&amp;y=2</link>
<description>The <b>llama</b> is a camelid &amp; more....</description></item>
<item><title>Empty</title><link></link></item>
</channel></rss>"#;
        let hits = parse_results(xml).unwrap();
        assert_eq!(
            hits,
            vec![KiwixHit {
                title: "Llama".into(),
                link: "/wiki/A/Llama?x=1&y=2".into(),
                snippet: "The llama is a camelid & more....".into(),
            }]
        );
    }

    #[test]
    fn a_server_error_is_reported_with_its_details() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8">
<error>Invalid request</error>
<detail>No such book: nope</detail>"#;
        let e = parse_results(xml).unwrap_err();
        assert!(
            e.contains("Invalid request") && e.contains("No such book: nope"),
            "{e}"
        );
        assert!(parse_results("<html>a login page</html>").is_err());
    }

    #[test]
    fn raw_pages_are_found_for_both_link_styles() {
        assert_eq!(
            raw_path("/", "/wiki_en/A/Llama").as_deref(),
            Some("/raw/wiki_en/content/A/Llama")
        );
        assert_eq!(
            raw_path("/kiwix/", "/kiwix/content/wiki_en/Llama").as_deref(),
            Some("/kiwix/raw/wiki_en/content/Llama")
        );
        assert_eq!(raw_path("/kiwix", "/elsewhere/b/x"), None);
        assert_eq!(raw_path("/", "/onlybook"), None);
    }

    #[test]
    fn the_lead_stops_at_the_first_section() {
        let page = "<html><head><title>T</title><script>x()</script></head><body>\
            <p>First sentence. Second one.</p><h2>History</h2><p>Later.</p></body></html>";
        assert_eq!(article_lead(page), "First sentence. Second one.");
        let long = format!("<body><p>{}</p></body>", "Word word word. ".repeat(200));
        let lead = article_lead(&long);
        assert!(
            lead.len() <= LEAD_CHARS && lead.ends_with('.'),
            "{}",
            lead.len()
        );
    }
}
