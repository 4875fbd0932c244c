//! The time for the per-statement path, read at most once per batch of a worker's
//! sessions.
//!
//! Taking a server connection and giving it back each need the time (the pool's idle
//! and lifetime deadlines, the client's time holding a connection for `SHOW CLIENTS`):
//! two clock readings a statement. While a worker's executor polls a batch of woken
//! sessions ([`batch`]), the first [`now`] of the batch reads the clock and the others
//! get that reading, as pgbouncer reads its clock once per turn of its event loop; a
//! batch that never asks reads nothing. Off a batch (the main runtime, the timer thread,
//! tests) [`now`] reads the clock each time.
//!
//! A batch polls each woken session until it waits again, which is microseconds of work
//! each: the reading is that much behind the clock at most, far below the seconds the
//! deadlines it feeds are set in. Timers (`crate::timer`) keep reading the clock
//! themselves.

use std::cell::Cell;
use std::time::Instant;

/// This thread's clock.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// No batch runs: every [`now`] reads the clock.
    Off,
    /// A batch runs and has not asked for the time yet.
    Due,
    /// The reading of the batch that runs.
    Read(Instant),
}

thread_local! {
    static BATCH: Cell<Reading> = const { Cell::new(Reading::Off) };
}

/// The time: the current batch's reading on a worker polling its sessions, else the
/// clock's.
#[inline]
pub fn now() -> Instant {
    match BATCH.get() {
        Reading::Read(at) => at,
        Reading::Due => {
            let at = Instant::now();
            BATCH.set(Reading::Read(at));
            at
        }
        Reading::Off => Instant::now(),
    }
}

/// Starts a batch on this thread: until the guard drops, [`now`] reads the clock once
/// and returns that reading.
pub(crate) fn batch() -> Batch {
    BATCH.set(Reading::Due);
    Batch(())
}

/// While it lives, [`now`] on this thread returns its batch's reading.
#[must_use = "the batch's reading lasts as long as the guard"]
pub(crate) struct Batch(());

impl Drop for Batch {
    fn drop(&mut self) {
        BATCH.set(Reading::Off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_batch_holds_its_reading_and_the_clock_goes_on_after_it() {
        let before = Instant::now();
        {
            let _batch = batch();
            std::thread::sleep(Duration::from_millis(5));
            let first = now();
            assert!(
                first >= before + Duration::from_millis(5),
                "the batch reads the clock when first asked"
            );
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(now(), first, "inside a batch the reading stays");
            let other = std::thread::spawn(now).join().expect("thread");
            assert!(
                other >= first + Duration::from_millis(5),
                "another thread reads its own clock"
            );
        }
        let after = now();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            now() >= after + Duration::from_millis(5),
            "off a batch, the clock"
        );
    }
}
