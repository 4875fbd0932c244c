//! A worker thread's own copy of the classifications it used last, in front of the
//! router's shared cache (moka). A look-up here is one hash and one probe; moka's costs
//! several times that (its concurrent map, clock and housekeeping), and a statement with
//! inlined values (`UPDATE t SET v = v + 5 WHERE id = 42`) looked there twice: its own
//! text (a miss: the values are new) and then its shape.
//!
//! Exact texts and shapes are kept apart, each map bounded and emptied when full: texts
//! that are new each time fill `texts` and empty it, while the few shapes stay. Every
//! entry is one the shared cache holds (or held) too. When the router changes an entry
//! there ([`super::Router::learn_write`]) it counts a new generation, and each thread's
//! copy is dropped at its next look-up.

use std::cell::RefCell;
use std::sync::Arc;

use super::Classification;

/// Entries per map (texts, shapes) and thread.
const ENTRIES: usize = 256;
/// Longest text or shape kept: with [`ENTRIES`], at most 512 KiB of keys per thread.
const MAX_KEY: usize = 1024;

type Map = foldhash::HashMap<Box<str>, Arc<Classification>>;

/// One thread's copy, for one router in one generation.
#[derive(Default)]
pub(super) struct Front {
    /// The router and generation the entries are from.
    owner: (u64, u64),
    texts: Map,
    shapes: Map,
}

thread_local! {
    static FRONT: RefCell<Front> = RefCell::new(Front::default());
}

impl Front {
    /// Runs `f` with this thread's copy, emptied first unless it is router `router`'s in
    /// `generation`. `None` if the copy is in use further up this thread's stack.
    pub(super) fn with<R>(
        router: u64,
        generation: u64,
        f: impl FnOnce(&mut Front) -> R,
    ) -> Option<R> {
        FRONT.with(|front| {
            let mut front = front.try_borrow_mut().ok()?;
            if front.owner != (router, generation) {
                front.texts.clear();
                front.shapes.clear();
                front.owner = (router, generation);
            }
            Some(f(&mut front))
        })
    }

    pub(super) fn text(&self, sql: &str) -> Option<Arc<Classification>> {
        self.texts.get(sql).cloned()
    }

    pub(super) fn shape(&self, shape: &str) -> Option<Arc<Classification>> {
        self.shapes.get(shape).cloned()
    }

    pub(super) fn keep_text(&mut self, sql: &str, classification: &Arc<Classification>) {
        keep(&mut self.texts, sql, classification);
    }

    pub(super) fn keep_shape(&mut self, shape: &str, classification: &Arc<Classification>) {
        keep(&mut self.shapes, shape, classification);
    }
}

fn keep(map: &mut Map, key: &str, classification: &Arc<Classification>) {
    if key.len() > MAX_KEY {
        return;
    }
    if map.len() >= ENTRIES {
        map.clear();
    }
    map.insert(Box::from(key), Arc::clone(classification));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::classify;

    #[test]
    fn a_full_map_starts_again_and_another_owner_empties_both() {
        let c = Arc::new(classify("select 1"));
        Front::with(1, 1, |front| {
            for i in 0..ENTRIES {
                front.keep_text(&format!("select {i}"), &c);
            }
            front.keep_shape("select 0", &c);
            assert!(front.text("select 0").is_some());
            // Full: the next one empties the texts, not the shapes.
            front.keep_text("select 'next'", &c);
            assert!(front.text("select 0").is_none());
            assert!(front.text("select 'next'").is_some());
            assert!(front.shape("select 0").is_some());
            front.keep_text(&"x".repeat(MAX_KEY + 1), &c);
            assert!(front.text(&"x".repeat(MAX_KEY + 1)).is_none());
        })
        .expect("not in use");
        // The same router in a new generation, or another router: nothing is kept.
        Front::with(1, 2, |front| {
            assert!(front.text("select 'next'").is_none());
            assert!(front.shape("select 0").is_none());
            front.keep_shape("select 0", &c);
        })
        .expect("not in use");
        Front::with(2, 2, |front| assert!(front.shape("select 0").is_none())).expect("not in use");
        // In use further up the stack: no copy is lent twice.
        Front::with(3, 1, |_| assert!(Front::with(3, 1, |_| ()).is_none())).expect("not in use");
    }
}
