//! How many workers take sessions: as many as the load needs.
//!
//! Two half-busy workers each go to sleep and wake up again for their half of the
//! traffic, where one worker with all of it finds several events each time it looks. On
//! the 2-core machine of `benches/RESULTS.md`, one worker serving every session at 32
//! clients used a tenth to three tenths less user CPU per statement than two, at about the
//! same throughput (`benches/PROFILE.md`, twenty-seventh and twenty-eighth rounds). So the
//! sessions gather on as few workers as their load needs:
//!
//! - pgway starts with every worker *active* (taking sessions); new clients go to the
//!   active worker with the fewest sessions;
//! - every [`PERIOD`], [`Placement::follow_load`] looks at how busy each worker was
//!   ([`next_active`]): when the active workers together would keep one worker fewer
//!   less than [`SHRINK_PERMILLE`] busy, for [`CALM_PERIODS`] in a row, the last active
//!   worker stops taking sessions; when one active worker is busy more than
//!   [`GROW_PERMILLE`] of the time, one more worker takes sessions again;
//! - a session on an inactive worker, or on an active worker with two sessions more than
//!   another right after one was added, moves when it next waits for its client between
//!   requests ([`super::destination`]): its future goes to the other worker's executor
//!   and its client socket to that worker's reactor. Nothing else of it changes, and a
//!   session holding a server connection never moves.
//!
//! A worker's load is the CPU time its thread used in the period (the first field of its
//! `/proc/.../schedstat`, read by [`Placement::follow_load`] on the main runtime): the
//! statement path does nothing for it. While a worker polls for `busy_poll` it uses its
//! CPU whole, and counts as busy: where the machine has CPUs to spare for that, every
//! worker takes sessions, as without this. Without `/proc/thread-self/schedstat`, every
//! worker always takes sessions.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::executor::Home;
use super::SchedStat;

/// How often the load is looked at.
pub const PERIOD: Duration = Duration::from_millis(250);

/// An active worker busy for more than this share of a period (in thousandths) makes
/// one more worker active.
const GROW_PERMILLE: u64 = 600;

/// The active workers together busy for less than this share of a period (in
/// thousandths) per worker, counting one worker fewer, make one fewer active.
const SHRINK_PERMILLE: u64 = 350;

/// Periods in a row the load must stay that low before a worker stops taking sessions.
const CALM_PERIODS: u32 = 4;

/// What the placement knows of one worker.
#[derive(Debug, Default)]
struct Worker {
    /// Its sessions, counted from when a client is handed to it until its session ends
    /// or moves away.
    sessions: AtomicUsize,
    /// Its thread's scheduler statistics, opened on the thread.
    cpu: OnceLock<SchedStat>,
    /// The way into its executor, once it runs.
    home: OnceLock<Arc<Home>>,
}

/// Which workers take sessions, and the sessions each has. Shared by the workers, the
/// accept loop and `/metrics`.
#[derive(Debug)]
pub struct Placement {
    workers: Box<[Worker]>,
    /// The first `active` workers take sessions (at least one).
    active: AtomicUsize,
    /// A worker was just made active: sessions of the busier ones move to it.
    spread: AtomicBool,
}

impl Placement {
    /// `count` workers, all active.
    pub fn new(count: usize) -> Self {
        let count = count.max(1);
        Self {
            workers: (0..count).map(|_| Worker::default()).collect(),
            active: AtomicUsize::new(count),
            spread: AtomicBool::new(false),
        }
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// How many take sessions now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Each worker's sessions now.
    pub fn sessions(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|worker| worker.sessions.load(Ordering::Relaxed))
            .collect()
    }

    /// The active worker with the fewest sessions.
    fn fewest(&self, active: usize) -> usize {
        (0..active.min(self.workers.len()))
            .min_by_key(|&i| self.workers[i].sessions.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Picks the worker for a new client and counts the session there.
    pub(super) fn place_new(&self) -> usize {
        let to = self.fewest(self.active());
        self.workers[to].sessions.fetch_add(1, Ordering::Relaxed);
        to
    }

    /// A session of `worker` ended (or never started).
    pub(super) fn left(&self, worker: usize) {
        if let Some(worker) = self.workers.get(worker) {
            worker.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Where a session of worker `here` that waits for its client should move, if
    /// anywhere: per request, two loads of values that rarely change.
    #[inline]
    pub(super) fn destination(&self, here: usize) -> Option<usize> {
        let active = self.active.load(Ordering::Relaxed);
        if here < active && !self.spread.load(Ordering::Relaxed) {
            return None;
        }
        let to = self.fewest(active);
        let sessions = |i: usize| self.workers[i].sessions.load(Ordering::Relaxed);
        (here >= active || sessions(here) > sessions(to) + 1).then_some(to)
    }

    /// The executor of worker `to`, if it runs.
    pub(super) fn home(&self, to: usize) -> Option<&Arc<Home>> {
        self.workers.get(to)?.home.get()
    }

    /// Worker `index`'s executor runs, reached through `home`.
    pub(super) fn set_home(&self, index: usize, home: Arc<Home>) {
        if let Some(worker) = self.workers.get(index) {
            let _ = worker.home.set(home);
        }
    }

    /// A session moved from worker `from` to worker `to`.
    pub(super) fn moved(&self, from: usize, to: usize) {
        self.left(from);
        if let Some(worker) = self.workers.get(to) {
            worker.sessions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Opens the calling thread's scheduler statistics as worker `index`'s (on the
    /// worker's thread, as it starts).
    pub(super) fn open_cpu_clock(&self, index: usize) {
        let Some(worker) = self.workers.get(index) else {
            return;
        };
        if let Some(stat) = SchedStat::open() {
            let _ = worker.cpu.set(stat);
        }
    }

    /// Every [`PERIOD`] until `stop`: how many workers take sessions, from how busy they
    /// were ([`next_active`]). Runs on the main runtime.
    pub async fn follow_load(self: Arc<Self>, stop: CancellationToken) {
        if self.count() == 1 {
            return;
        }
        // The workers open their statistics as they start.
        crate::timer::sleep(PERIOD).await;
        let Some(mut last) = self.cpu_times() else {
            tracing::info!(
                "no /proc/thread-self/schedstat here: every worker takes sessions, whatever the load"
            );
            return;
        };
        let mut since = Instant::now();
        let mut calm = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = crate::timer::sleep(PERIOD) => {}
            }
            let now = Instant::now();
            let elapsed = now.duration_since(since).as_nanos().max(1);
            let Some(totals) = self.cpu_times() else {
                return;
            };
            let permille: Vec<u64> = totals
                .iter()
                .zip(&last)
                .map(|(now, before)| {
                    let busy = u128::from(now.saturating_sub(*before)) * 1000 / elapsed;
                    u64::try_from(busy).unwrap_or(u64::MAX)
                })
                .collect();
            (last, since) = (totals, now);
            let active = self.active();
            let next = next_active(active, &permille, &mut calm);
            tracing::trace!(active, busy_permille = ?permille, "worker load");
            if next != active {
                tracing::debug!(active = next, busy_permille = ?permille, "workers taking sessions");
                self.active.store(next, Ordering::Relaxed);
            }
            // A worker that became active takes sessions from the busier ones until the
            // active ones are within one session of each other.
            let spreading = (next > active || self.spread.load(Ordering::Relaxed))
                && next > 1
                && self.uneven(next);
            self.spread.store(spreading, Ordering::Relaxed);
        }
    }

    /// The first `active` workers' sessions differ by more than one.
    fn uneven(&self, active: usize) -> bool {
        let sessions = self.sessions();
        let active = &sessions[..active.min(sessions.len())];
        let (Some(most), Some(least)) = (active.iter().max(), active.iter().min()) else {
            return false;
        };
        *most > least + 1
    }

    /// Sets which workers take sessions, as [`Self::follow_load`] would.
    #[cfg(test)]
    pub(super) fn set_active(&self, active: usize, spread: bool) {
        self.active.store(active, Ordering::Relaxed);
        self.spread.store(spread, Ordering::Relaxed);
    }

    /// Each worker thread's CPU time so far, in nanoseconds; `None` if one cannot be read.
    fn cpu_times(&self) -> Option<Vec<u64>> {
        self.workers
            .iter()
            .map(|worker| worker.cpu.get()?.ran())
            .collect()
    }
}

/// How many workers take sessions after a period in which they were busy `permille`
/// thousandths of the time each (`permille` has one entry per worker), `active` of them
/// taking sessions, and the load was low for `calm` periods before (updated).
fn next_active(active: usize, permille: &[u64], calm: &mut u32) -> usize {
    let count = permille.len();
    let busiest = permille.iter().take(active).copied().max().unwrap_or(0);
    // Sessions left on inactive workers are on their way to the active ones: their load
    // counts.
    let total: u64 = permille.iter().sum();
    if busiest > GROW_PERMILLE && active < count {
        *calm = 0;
        return active + 1;
    }
    let fewer = active.saturating_sub(1) as u64;
    if active > 1 && total < SHRINK_PERMILLE * fewer {
        *calm += 1;
        if *calm >= CALM_PERIODS {
            *calm = 0;
            return active - 1;
        }
    } else {
        *calm = 0;
    }
    active
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `next_active` over the periods' loads from `active`, returning each result.
    fn run(mut active: usize, periods: &[&[u64]]) -> Vec<usize> {
        let mut calm = 0;
        periods
            .iter()
            .map(|permille| {
                active = next_active(active, permille, &mut calm);
                active
            })
            .collect()
    }

    #[test]
    fn a_light_load_gathers_on_one_worker_after_calm_periods() {
        let light: &[u64] = &[100, 80, 60, 50];
        assert_eq!(run(4, &[light; 12]), [4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1]);
    }

    #[test]
    fn one_busy_period_breaks_the_calm() {
        let light: &[u64] = &[100, 100];
        let busy: &[u64] = &[400, 300];
        assert_eq!(
            run(2, &[light, light, light, busy, light, light, light, light]),
            [2, 2, 2, 2, 2, 2, 2, 1]
        );
    }

    #[test]
    fn a_busy_active_worker_brings_in_one_more_per_period_up_to_all() {
        let busy: &[u64] = &[900, 0, 0];
        assert_eq!(run(1, &[busy, busy, busy, busy]), [2, 3, 3, 3]);
    }

    #[test]
    fn a_load_between_the_thresholds_keeps_the_workers_as_they_are() {
        // Two workers at 300 each: one would be at 600, too busy to give one up; neither
        // is busy enough to need a third.
        let mid: &[u64] = &[300, 300, 0];
        assert_eq!(run(2, &[mid; 10]), [2; 10]);
        // One worker at 500 does not need a second.
        let one: &[u64] = &[500, 0, 0];
        assert_eq!(run(1, &[one; 10]), [1; 10]);
    }

    #[test]
    fn sessions_of_inactive_workers_and_of_crowded_ones_move() {
        let placement = Placement::new(3);
        for _ in 0..6 {
            placement.place_new();
        }
        assert_eq!(placement.sessions(), [2, 2, 2]);
        assert_eq!(placement.destination(2), None);
        placement.active.store(2, Ordering::Relaxed);
        assert_eq!(placement.destination(1), None);
        assert_eq!(placement.destination(2), Some(0));
        placement.moved(2, 0);
        placement.moved(2, 1);
        assert_eq!(placement.sessions(), [3, 3, 0]);
        assert_eq!(
            placement.place_new(),
            0,
            "new clients go to active workers only"
        );
        // A third worker becomes active: the others' sessions move to it while they have
        // two more than it.
        placement.active.store(3, Ordering::Relaxed);
        placement.spread.store(true, Ordering::Relaxed);
        assert_eq!(placement.destination(0), Some(2));
        placement.moved(0, 2);
        placement.moved(1, 2);
        assert_eq!(placement.sessions(), [3, 2, 2]);
        assert_eq!(placement.destination(0), None);
        assert!(!placement.uneven(3));
        placement.left(0);
        assert_eq!(placement.sessions(), [2, 2, 2]);
    }
}
