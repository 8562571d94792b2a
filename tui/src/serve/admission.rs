//! What stands in front of the engine: a bounded queue (a request beyond it is answered 503
//! with `Retry-After` instead of waiting without bound) and the optional bearer key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Admits at most `running` requests to the engine at once and `waiting` more in line.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    running_slots: usize,
    admitted: AtomicUsize,
    capacity: usize,
}

/// A place in line; [`Ticket::start`] waits for a place on the engine. Dropping it frees both.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// `running` requests at once (at least 1), `waiting` more queued.
    pub fn new(running: usize, waiting: usize) -> Arc<Self> {
        let running = running.max(1);
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(running)),
            running_slots: running,
            admitted: AtomicUsize::new(0),
            capacity: running + waiting,
        })
    }

    /// A place in line, or `None` when the line is full.
    pub fn enter(self: &Arc<Self>) -> Option<Ticket> {
        let mut now = self.admitted.load(Ordering::Acquire);
        loop {
            if now >= self.capacity {
                return None;
            }
            match self.admitted.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Ticket {
                        admission: self.clone(),
                        permit: None,
                    })
                }
                Err(seen) => now = seen,
            }
        }
    }

    /// Requests on the engine now.
    pub fn running(&self) -> usize {
        self.running_slots - self.slots.available_permits()
    }

    /// Requests waiting for a place on the engine.
    pub fn waiting(&self) -> usize {
        self.admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.running())
    }
}

impl Ticket {
    /// Waits for a place on the engine.
    pub async fn start(&mut self) {
        if self.permit.is_none() {
            // The semaphore is never closed.
            self.permit = self.admission.slots.clone().acquire_owned().await.ok();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.permit.take();
        self.admission.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Compares a presented key with the expected one in time that depends on their lengths only.
pub fn keys_match(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The key of an `Authorization: Bearer KEY` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, key) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_line_is_bounded_and_places_come_back() {
        let admission = Admission::new(1, 1);
        let mut first = admission.enter().unwrap();
        first.start().await;
        let second = admission.enter().unwrap();
        assert!(
            admission.enter().is_none(),
            "a third request must be refused"
        );
        assert_eq!((admission.running(), admission.waiting()), (1, 1));
        drop(first);
        assert_eq!((admission.running(), admission.waiting()), (0, 1));
        drop(second);
        assert!(admission.enter().is_some());
    }

    #[test]
    fn keys_compare_whole() {
        assert!(keys_match(b"secret", b"secret"));
        assert!(!keys_match(b"secreT", b"secret"));
        assert!(!keys_match(b"secret1", b"secret"));
        assert!(!keys_match(b"", b"secret"));
        assert_eq!(bearer("Bearer  abc "), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
