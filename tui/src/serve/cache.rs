//! The server's prompt cache: sequences of finished requests stay alive (up to a bound), and a
//! new request continues the one that shares the longest prefix with its prompt, so a client
//! that resends a growing prompt (the agent over HTTP, a chat) decodes only what is new —
//! llama-server's `cache_prompt` slots, on geek's engine.

use std::sync::Mutex;

use geek_backend::{Engine, Sequence};

use super::types::RequestAdapter;

/// An idle sequence: the weights it was decoded with and its tokens.
type Idle = (Sequence, RequestAdapter, Vec<i32>);

/// Idle sequences and their tokens, most recently used last.
pub struct PromptCache {
    idle: Mutex<Vec<Idle>>,
    capacity: usize,
}

/// A sequence for a prompt: `cached` of its tokens are already in it.
pub struct Reused {
    /// The sequence, truncated to the shared prefix.
    pub seq: Sequence,
    /// Tokens of the prompt it already holds.
    pub cached: usize,
}

impl PromptCache {
    /// Keeps at most `capacity` idle sequences (0 turns caching off).
    pub fn new(capacity: usize) -> Self {
        PromptCache {
            idle: Mutex::new(Vec::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The idle sequence on `adapter`'s weights sharing the longest prefix with `prompt`, cut
    /// back to that prefix, or a new sequence. A cached sequence is reused only when the prompt
    /// shares at least half of its tokens (llama-server's slot-similarity rule), so a short
    /// unrelated prompt does not destroy a long conversation that will come back. At least the
    /// prompt's last token is always decoded again, so the sequence ends with fresh logits.
    pub async fn sequence_for(
        &self,
        engine: &Engine,
        prompt: &[i32],
        adapter: RequestAdapter,
    ) -> geek_backend::Result<Reused> {
        let best = {
            let mut idle = self.lock();
            let limit = prompt.len().saturating_sub(1);
            let best = idle
                .iter()
                .enumerate()
                .filter(|(_, (_, on, _))| *on == adapter)
                .map(|(i, (_, _, tokens))| {
                    (i, shared_prefix(tokens, prompt).min(limit), tokens.len())
                })
                .filter(|&(_, shared, held)| shared > 0 && 2 * shared >= held)
                .max_by_key(|&(_, shared, _)| shared);
            best.map(|(index, shared, _)| (idle.remove(index).0, shared))
        };
        if let Some((seq, cached)) = best {
            seq.truncate(cached).await?;
            return Ok(Reused { seq, cached });
        }
        let seq = match Self::new_sequence(engine, adapter).await {
            Err(geek_backend::Error::NoFreeSequence { .. }) => {
                self.clear();
                Self::new_sequence(engine, adapter).await?
            }
            other => other?,
        };
        Ok(Reused { seq, cached: 0 })
    }

    /// A new, empty sequence on `adapter`'s weights.
    pub async fn new_sequence(
        engine: &Engine,
        adapter: RequestAdapter,
    ) -> geek_backend::Result<Sequence> {
        let seq = engine.sequence()?;
        if let RequestAdapter::Pinned(lora) = adapter {
            seq.set_lora(lora).await?;
        }
        Ok(seq)
    }

    /// Keeps a finished request's sequence (decoded on `adapter`'s weights) for later prompts.
    pub async fn put(&self, seq: Sequence, adapter: RequestAdapter) {
        if self.capacity == 0 {
            return;
        }
        let Ok(tokens) = seq.tokens().await else {
            return;
        };
        let mut idle = self.lock();
        if idle.len() >= self.capacity {
            idle.remove(0);
        }
        idle.push((seq, adapter, tokens));
    }

    /// Idle sequences kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Drops every idle sequence (their KV cells are needed).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

fn shared_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::shared_prefix;

    #[test]
    fn shared_prefixes_are_counted() {
        assert_eq!(shared_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(shared_prefix(&[], &[1]), 0);
        assert_eq!(shared_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
