//! Prompt-lookup drafting: the next tokens of a sequence guessed by finding its last n-gram
//! earlier in the sequence and copying what followed it there. Facts extracted from passages
//! mostly copy spans of those passages, so drafts are often right; the scheduler decodes a
//! draft together with the sampled token and keeps the longest prefix greedy decoding agrees
//! with, so the output is exactly that of plain greedy decoding.

use llama_cpp_2::token::LlamaToken;

/// Longest and shortest n-grams matched.
const MAX_NGRAM: usize = 3;
const MIN_NGRAM: usize = 2;

/// Up to `max` tokens that followed the most recent earlier occurrence of the longest
/// suffix n-gram of `tokens` (3 tokens, else 2); empty when the suffix never occurred.
pub(crate) fn draft(tokens: &[LlamaToken], max: usize) -> Vec<LlamaToken> {
    if max == 0 {
        return Vec::new();
    }
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        // The most recent match that is not the suffix itself and has something after it.
        let found = (0..tokens.len() - n)
            .rev()
            .find(|&start| &tokens[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            let to = (from + max).min(tokens.len());
            return tokens[from..to].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().map(|&i| LlamaToken::new(i)).collect()
    }

    #[test]
    fn the_continuation_of_the_latest_match_is_drafted() {
        // ... 5 6 7 8 9 ... 5 6 7 | → 8 9 10
        let seq = t(&[1, 5, 6, 7, 8, 9, 10, 2, 3, 5, 6, 7]);
        assert_eq!(draft(&seq, 3), t(&[8, 9, 10]));
        assert_eq!(draft(&seq, 1), t(&[8]));
        // The later of two occurrences wins.
        let seq = t(&[6, 7, 1, 6, 7, 2, 6, 7]);
        assert_eq!(draft(&seq, 2), t(&[2, 6]));
        // No earlier occurrence of the last bigram: nothing.
        assert!(draft(&t(&[1, 2, 3, 4]), 4).is_empty());
        assert!(draft(&t(&[1]), 4).is_empty());
        assert!(draft(&seq, 0).is_empty());
    }
}
