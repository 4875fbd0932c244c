//! Locks taken where a panic elsewhere must not stop the rest of pgway.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The mutex's value, also after a panic elsewhere poisoned it. For values that stay
/// consistent at every point a panic could interrupt their holder (a counter, a list
/// changed by one push or remove), so that one failed session does not take every later
/// lock of the same mutex down with it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
