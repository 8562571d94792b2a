//! A fact's citations: `fact [P1, P3]` mapped to the passages that were shown.

use crate::trace::PassageRef;

/// Splits `fact [P1, P3]` into the fact and the cited passage ids.
pub(super) fn split_citations(text: &str, passages: &[PassageRef]) -> (String, Vec<String>) {
    let Some(open) = text.rfind('[') else {
        return (text.trim().to_string(), Vec::new());
    };
    let inside = text[open + 1..].trim_end_matches(']');
    let cited: Vec<String> = inside
        .split(',')
        .filter_map(|r| r.trim().strip_prefix('P')?.parse::<usize>().ok())
        .filter_map(|n| passages.get(n.checked_sub(1)?).map(|p| p.id.clone()))
        .collect();
    if cited.is_empty() {
        return (text.trim().to_string(), cited);
    }
    (text[..open].trim().to_string(), cited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_map_to_shown_passages() {
        let refs = vec![
            PassageRef {
                id: "Llama-3".into(),
                title: "Llama".into(),
                score: 1.0,
            },
            PassageRef {
                id: "vital:Llama".into(),
                title: "Llama".into(),
                score: 0.5,
            },
        ];
        assert_eq!(
            split_citations("About 11.5 months. [P2, P1]", &refs),
            (
                "About 11.5 months.".into(),
                vec!["vital:Llama".into(), "Llama-3".into()]
            )
        );
        assert_eq!(
            split_citations("No sources here", &refs),
            ("No sources here".into(), vec![])
        );
        // A reference to a passage that was not shown is dropped.
        assert_eq!(split_citations("x [P7]", &refs).1, Vec::<String>::new());
    }
}
