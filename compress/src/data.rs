//! Training data: `{"prompt", "completion"}` JSONL, tokenized by the backend's tokenizer (so
//! training and serving see the same tokens) and packed into fixed-length rows.

use std::io::{BufRead, BufReader};
use std::path::Path;

use geek_backend::Engine;
use serde::Deserialize;

use crate::{Error, Result};

/// One training example; the loss covers the completion only, but for its context spans.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Example {
    /// Context the loss does not cover.
    pub prompt: String,
    /// Text the loss covers.
    pub completion: String,
    /// Byte ranges of the completion the loss skips (text the agent writes itself, as
    /// `geek data trajectories` marks it); each piece is tokenized apart.
    #[serde(default)]
    pub context: Vec<(usize, usize)>,
}

impl Example {
    /// The completion in pieces, each with whether the loss covers it.
    fn pieces(&self) -> Vec<(&str, bool)> {
        let c = &self.completion;
        let mut out = Vec::new();
        let mut at = 0;
        for &(start, end) in &self.context {
            if at < start {
                out.push((&c[at..start], true));
            }
            out.push((&c[start..end], false));
            at = end;
        }
        if at < c.len() {
            out.push((&c[at..], true));
        }
        out
    }
}

/// Reads JSONL examples; a malformed line is an [`Error::Data`] with its line number, and no
/// example is returned then.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(Error::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(&line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message: format!("expected {{\"prompt\": …, \"completion\": …}}: {e}"),
        })?;
        if ex.completion.is_empty() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: i + 1,
                message: "empty completion".into(),
            });
        }
        let mut at = 0;
        for &(start, end) in &ex.context {
            let fits = at <= start && start < end && end <= ex.completion.len();
            if !fits
                || !ex.completion.is_char_boundary(start)
                || !ex.completion.is_char_boundary(end)
            {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: format!(
                        "context span {start}..{end} is not an ordered range of character boundaries of the completion"
                    ),
                });
            }
            at = end;
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: 0,
            message: "no examples".into(),
        });
    }
    Ok(out)
}

/// An example as token ids: the first `prompt_len` are prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tokenized {
    /// Prompt then completion tokens.
    pub tokens: Vec<u32>,
    /// How many leading tokens are prompt.
    pub prompt_len: usize,
    /// Token ranges of the completion that are context, not targets.
    pub context: Vec<(usize, usize)>,
}

impl Tokenized {
    /// Whether the token at `p` is a target.
    fn is_target(&self, p: usize) -> bool {
        p >= self.prompt_len.max(1) && !self.context.iter().any(|&(s, e)| s <= p && p < e)
    }
}

/// Tokenizes with the model's own llama.cpp tokenizer: the prompt with the model's special
/// prefix (BOS, when it has one), the completion without, as the agent appends them — each
/// context piece apart, as the agent appends its own text between the model's.
pub fn tokenize(engine: &Engine, examples: &[Example]) -> Result<Vec<Tokenized>> {
    examples
        .iter()
        .map(|ex| {
            let prompt = engine.tokenize(ex.prompt.clone(), true).wait()?;
            let mut out = Tokenized {
                prompt_len: prompt.len(),
                tokens: prompt.into_iter().map(|t| t as u32).collect(),
                context: Vec::new(),
            };
            for (piece, target) in ex.pieces() {
                let ids = engine.tokenize(piece.to_string(), false).wait()?;
                let start = out.tokens.len();
                out.tokens.extend(ids.into_iter().map(|t| t as u32));
                if !target && out.tokens.len() > start {
                    out.context.push((start, out.tokens.len()));
                }
            }
            Ok(out)
        })
        .collect()
}

/// One packed row: `seq_len` tokens holding whole examples (each its own attention segment),
/// padded with token 0, and the positions whose next token is in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Tokens, padded.
    pub tokens: Vec<u32>,
    /// Lengths of the examples in the row, in order.
    pub segments: Vec<usize>,
    /// (position, next token) pairs in the loss: completion tokens predicted from inside their
    /// own example.
    pub targets: Vec<(usize, u32)>,
}

/// Packs examples (in `order`) greedily into rows of `seq_len` tokens. An example longer than
/// a row keeps its last `seq_len` tokens (the end of the completion); returns the rows and how
/// many examples were cut.
pub fn pack(examples: &[Tokenized], order: &[usize], seq_len: usize) -> (Vec<Row>, usize) {
    let mut rows = Vec::new();
    let mut cut = 0;
    let mut current = Row {
        tokens: Vec::with_capacity(seq_len),
        segments: Vec::new(),
        targets: Vec::new(),
    };
    let finish = |row: &mut Row, rows: &mut Vec<Row>| {
        if !row.segments.is_empty() {
            let mut done = std::mem::replace(
                row,
                Row {
                    tokens: Vec::with_capacity(seq_len),
                    segments: Vec::new(),
                    targets: Vec::new(),
                },
            );
            done.tokens.resize(seq_len, 0);
            rows.push(done);
        }
    };
    for &i in order {
        let ex = &examples[i];
        let drop = ex.tokens.len().saturating_sub(seq_len);
        cut += usize::from(drop > 0);
        let tokens = &ex.tokens[drop..];
        if current.tokens.len() + tokens.len() > seq_len {
            finish(&mut current, &mut rows);
        }
        let start = current.tokens.len();
        for (p, &next) in tokens.iter().enumerate().skip(1) {
            if ex.is_target(p + drop) {
                current.targets.push((start + p - 1, next));
            }
        }
        current.tokens.extend_from_slice(tokens);
        current.segments.push(tokens.len());
    }
    finish(&mut current, &mut rows);
    (rows, cut)
}

/// A deterministic permutation of `0..n` for `seed` (Fisher–Yates on SplitMix64).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = crate::init::Rng::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_examples_whole_and_targets_completions_only() {
        let ex = vec![
            Tokenized {
                tokens: vec![1, 2, 3, 4],
                prompt_len: 2,
                ..Tokenized::default()
            },
            Tokenized {
                tokens: vec![5, 6, 7],
                prompt_len: 1,
                ..Tokenized::default()
            },
            Tokenized {
                tokens: vec![8, 9, 10, 11, 12, 13],
                prompt_len: 3,
                ..Tokenized::default()
            },
        ];
        let (rows, cut) = pack(&ex, &[0, 1, 2], 8);
        assert_eq!(cut, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].tokens, vec![1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(rows[0].segments, vec![4, 3]);
        // 3 and 4 (after prompt [1, 2]); 6 and 7 (after prompt [5]).
        assert_eq!(rows[0].targets, vec![(1, 3), (2, 4), (4, 6), (5, 7)]);
        assert_eq!(rows[1].targets, vec![(2, 11), (3, 12), (4, 13)]);
        // Too long: the end survives.
        let (rows, cut) = pack(&ex, &[2], 4);
        assert_eq!(cut, 1);
        assert_eq!(rows[0].tokens, vec![10, 11, 12, 13]);
        assert_eq!(rows[0].targets, vec![(0, 11), (1, 12), (2, 13)]);
        // Context tokens inside a completion are not targets, also in a cut example.
        let with_context = vec![Tokenized {
            tokens: vec![1, 2, 3, 4, 5, 6],
            prompt_len: 1,
            context: vec![(2, 4)],
        }];
        let (rows, _) = pack(&with_context, &[0], 8);
        assert_eq!(rows[0].targets, vec![(0, 2), (3, 5), (4, 6)]);
        let (rows, _) = pack(&with_context, &[0], 3);
        assert_eq!(rows[0].targets, vec![(0, 5), (1, 6)]);
        let s = shuffled(10, 1);
        let mut sorted = s.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(s, shuffled(10, 1));
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let dir = std::env::temp_dir().join(format!("geek-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n",
        )
        .unwrap();
        match read_jsonl(&path) {
            Err(Error::Data { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
        // Context spans must be ordered ranges inside the completion.
        let spans = |context: &str| {
            let line =
                format!("{{\"prompt\": \"a\", \"completion\": \"bcd\", \"context\": {context}}}\n");
            std::fs::write(&path, line).unwrap();
            read_jsonl(&path)
        };
        assert_eq!(
            spans("[[0, 1], [2, 3]]").unwrap()[0].pieces(),
            vec![("b", false), ("c", true), ("d", false)]
        );
        for bad in ["[[0, 4]]", "[[2, 3], [0, 1]]", "[[1, 1]]"] {
            assert!(
                matches!(spans(bad), Err(Error::Data { line: 1, .. })),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
