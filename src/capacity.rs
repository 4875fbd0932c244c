//! A semaphore whose size a reload changes: the client connection limit.
//!
//! Growing adds permits at once. Shrinking forgets the free permits now and takes the
//! rest as their holders give them back (a task waits for them), so no holder is
//! interrupted and the bound holds again once they are done.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Permits up to a size that can change.
#[derive(Debug)]
pub struct Capacity {
    /// The permits; `size` less those held.
    pub permits: Arc<Semaphore>,
    size: AtomicUsize,
}

impl Capacity {
    /// `size` permits.
    pub fn new(size: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
        }
    }

    /// The size in force.
    pub fn size(&self) -> usize {
        self.size.load(Relaxed)
    }

    /// Sets the size to `size`. A shrink below what is held completes as holders give
    /// permits back, on a task of the current runtime.
    pub fn resize(&self, size: usize) {
        let before = self.size.swap(size, Relaxed);
        if size >= before {
            self.permits.add_permits(size - before);
            return;
        }
        let shrink = before - size;
        let owed = shrink - self.permits.forget_permits(shrink);
        if owed > 0 {
            let permits = Arc::clone(&self.permits);
            let owed = u32::try_from(owed).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(taken) = permits.acquire_many(owed).await {
                    taken.forget();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_at_once_and_shrinks_as_permits_come_back() {
        let capacity = Capacity::new(3);
        let a = capacity.permits.try_acquire().expect("free");
        let b = capacity.permits.try_acquire().expect("free");
        capacity.resize(1);
        // The free one is forgotten now; one of the two held is owed.
        assert_eq!(capacity.permits.available_permits(), 0);
        drop(a);
        drop(b);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(capacity.permits.available_permits(), 1, "size 1 again");
        capacity.resize(4);
        assert_eq!(capacity.permits.available_permits(), 4);
        assert_eq!(capacity.size(), 4, "none held");
    }
}
