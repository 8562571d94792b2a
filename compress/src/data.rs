//! Training data: `{"prompt", "completion"}` JSONL, tokenized by the backend's tokenizer (so
//! training and serving see the same tokens) and packed into fixed-length rows.

use std::io::{BufRead, BufReader};
use std::path::Path;

use geek_backend::Engine;
use serde::Deserialize;

use crate::{Error, Result};

/// One training example; the loss covers the completion only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Example {
    /// Context the loss does not cover.
    pub prompt: String,
    /// Text the loss covers.
    pub completion: String,
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
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Prompt then completion tokens.
    pub tokens: Vec<u32>,
    /// How many leading tokens are prompt.
    pub prompt_len: usize,
}

/// Tokenizes with the model's own llama.cpp tokenizer: the prompt with the model's special
/// prefix (BOS, when it has one), the completion without, as the agent appends them.
pub fn tokenize(engine: &Engine, examples: &[Example]) -> Result<Vec<Tokenized>> {
    examples
        .iter()
        .map(|ex| {
            let prompt = engine.tokenize(ex.prompt.clone(), true).wait()?;
            let completion = engine.tokenize(ex.completion.clone(), false).wait()?;
            let prompt_len = prompt.len();
            let tokens = prompt
                .into_iter()
                .chain(completion)
                .map(|t| t as u32)
                .collect();
            Ok(Tokenized { tokens, prompt_len })
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
    /// Which example (its index in the packed slice) each segment is.
    pub examples: Vec<usize>,
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
        examples: Vec::new(),
    };
    let finish = |row: &mut Row, rows: &mut Vec<Row>| {
        if !row.segments.is_empty() {
            let mut done = std::mem::replace(
                row,
                Row {
                    tokens: Vec::with_capacity(seq_len),
                    segments: Vec::new(),
                    targets: Vec::new(),
                    examples: Vec::new(),
                },
            );
            done.tokens.resize(seq_len, 0);
            rows.push(done);
        }
    };
    for &i in order {
        let ex = &examples[i];
        let (tokens, prompt_len) = if ex.tokens.len() > seq_len {
            cut += 1;
            let drop = ex.tokens.len() - seq_len;
            (&ex.tokens[drop..], ex.prompt_len.saturating_sub(drop))
        } else {
            (&ex.tokens[..], ex.prompt_len)
        };
        if current.tokens.len() + tokens.len() > seq_len {
            finish(&mut current, &mut rows);
        }
        let start = current.tokens.len();
        for (p, &next) in tokens.iter().enumerate().skip(prompt_len.max(1)) {
            current.targets.push((start + p - 1, next));
        }
        current.tokens.extend_from_slice(tokens);
        current.segments.push(tokens.len());
        current.examples.push(i);
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
            },
            Tokenized {
                tokens: vec![5, 6, 7],
                prompt_len: 1,
            },
            Tokenized {
                tokens: vec![8, 9, 10, 11, 12, 13],
                prompt_len: 3,
            },
        ];
        let (rows, cut) = pack(&ex, &[0, 1, 2], 8);
        assert_eq!(cut, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].tokens, vec![1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(rows[0].segments, vec![4, 3]);
        assert_eq!(
            (&rows[0].examples, &rows[1].examples),
            (&vec![0, 1], &vec![2])
        );
        // 3 and 4 (after prompt [1, 2]); 6 and 7 (after prompt [5]).
        assert_eq!(rows[0].targets, vec![(1, 3), (2, 4), (4, 6), (5, 7)]);
        assert_eq!(rows[1].targets, vec![(2, 11), (3, 12), (4, 13)]);
        // Too long: the end survives.
        let (rows, cut) = pack(&ex, &[2], 4);
        assert_eq!(cut, 1);
        assert_eq!(rows[0].tokens, vec![10, 11, 12, 13]);
        assert_eq!(rows[0].targets, vec![(0, 11), (1, 12), (2, 13)]);
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
