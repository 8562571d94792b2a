//! Turning a stream of token bytes into text: UTF-8 that may be split across tokens, and stop
//! strings that may be split across pieces.

/// Decodes UTF-8 that arrives in arbitrary byte chunks. Bytes of a character that is not
/// complete yet are kept for the next chunk; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is complete so far.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8 by construction.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left at the end of the stream (an incomplete character becomes U+FFFD).
    pub(crate) fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        self.pending.clear();
        char::REPLACEMENT_CHARACTER.to_string()
    }
}

/// What [`StopBuffer::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StopCheck {
    /// Text that can be shown: it cannot be part of a stop string.
    Emit(String),
    /// A stop string was found: `emit` is the text before it.
    Stopped {
        /// Text before the stop string, not shown yet.
        emit: String,
        /// Which stop string matched.
        stop: String,
    },
}

/// Holds back text that might be the start of a stop string.
#[derive(Debug, Default)]
pub(crate) struct StopBuffer {
    stops: Vec<String>,
    held: String,
}

impl StopBuffer {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopBuffer {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = first_match {
            let stop = stop.clone();
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stopped { emit, stop };
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck::Emit(emit)
    }

    /// Text held back when the stream ends without a stop string.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks() {
        let bytes = "héllo 🦙 wörld".as_bytes();
        for split in 0..bytes.len() {
            let mut s = Utf8Stream::default();
            let mut out = s.push(&bytes[..split]);
            out += &s.push(&bytes[split..]);
            out += &s.finish();
            assert_eq!(out, "héllo 🦙 wörld", "split at {split}");
        }
        // one byte at a time: never emits half a character
        let mut s = Utf8Stream::default();
        let pieces: Vec<String> = bytes.iter().map(|b| s.push(&[*b])).collect();
        assert!(pieces.iter().all(|p| p.chars().all(|c| c != '\u{FFFD}')));
        assert_eq!(pieces.concat(), "héllo 🦙 wörld");
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(s.push(b"\xe2\x82"), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_string_split_over_pieces() {
        let mut b = StopBuffer::new(&["\nQuestion:".to_string()]);
        assert_eq!(b.push("Yes, it"), StopCheck::Emit("Yes, it".into()));
        assert_eq!(b.push(" can.\nQue"), StopCheck::Emit(" can.".into()));
        assert_eq!(
            b.push("stion: next"),
            StopCheck::Stopped {
                emit: String::new(),
                stop: "\nQuestion:".into()
            }
        );
    }

    #[test]
    fn held_prefix_released_when_it_diverges() {
        let mut b = StopBuffer::new(&["END".to_string()]);
        assert_eq!(b.push("the EN"), StopCheck::Emit("the ".into()));
        assert_eq!(
            b.push("D"),
            StopCheck::Stopped {
                emit: String::new(),
                stop: "END".into()
            }
        );
        let mut b = StopBuffer::new(&["END".to_string()]);
        assert_eq!(b.push("the EN"), StopCheck::Emit("the ".into()));
        // The final "E" could still start "END", so it is held until the stream ends.
        assert_eq!(b.push("GINE"), StopCheck::Emit("ENGIN".into()));
        assert_eq!(b.finish(), "E");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut b = StopBuffer::new(&["b".to_string(), "a".to_string()]);
        assert_eq!(
            b.push("xxaxb"),
            StopCheck::Stopped {
                emit: "xx".into(),
                stop: "a".into()
            }
        );
    }
}
