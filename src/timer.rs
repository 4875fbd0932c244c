//! Timers for code that may run on a worker.
//!
//! A worker's reactor has no time driver: with one, every time the worker waits for
//! sockets it would also read the clock, looks for the next deadline in its timer
//! wheel and fires what is due (about 370 instructions a statement under `pgbench -S`,
//! where sessions set no timer at all with the default configuration). Timers are rare on
//! a worker (a login, a configured timeout, a back-off), so they live on one small runtime
//! of their own, on the `pgway-timer` thread, that does nothing else; a timer that fires
//! wakes its task on the worker like any other waker.
//!
//! Code that may run on a worker takes its timers from here, never from `tokio::time`
//! directly (on a worker, that would be the main runtime's timer wheel, turned by the
//! thread that accepts clients). Off the workers (the main runtime, tests) these are
//! tokio's own, on the current runtime.

use std::cell::Cell;
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Sleep, Timeout};

use crate::sync::lock;

/// The timer runtime's handle, once started.
static TIMERS: OnceLock<Handle> = OnceLock::new();

thread_local! {
    /// This thread's runtime has no time driver: timers go to [`TIMERS`].
    static ELSEWHERE: Cell<bool> = const { Cell::new(false) };
}

/// Starts the timer runtime if it is not running yet and returns its handle. It runs
/// until the process ends (an idle thread, parked until its next deadline).
fn timers() -> std::io::Result<&'static Handle> {
    static STARTING: Mutex<()> = Mutex::new(());
    if let Some(handle) = TIMERS.get() {
        return Ok(handle);
    }
    let _one_at_a_time = lock(&STARTING);
    if let Some(handle) = TIMERS.get() {
        return Ok(handle);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("pgway-timer".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(TIMERS.get_or_init(|| handle))
}

/// Starts the timer runtime for the workers if it does not run yet. A worker's thread
/// calls [`use_timer_runtime`] before it runs anything.
pub(crate) fn start_for_workers() -> std::io::Result<()> {
    timers().map(|_| ())
}

/// Marks this thread as a worker's, whose timers go to the timer runtime (see
/// [`start_for_workers`]).
pub(crate) fn use_timer_runtime() {
    ELSEWHERE.with(|e| e.set(true));
}

/// Runs `make` (which creates a timer) inside the timer runtime's context on a worker.
fn on_timers<T>(make: impl FnOnce() -> T) -> T {
    match TIMERS.get() {
        Some(handle) if ELSEWHERE.with(Cell::get) => {
            let _entered = handle.enter();
            make()
        }
        _ => make(),
    }
}

/// [`tokio::time::sleep`].
pub fn sleep(duration: Duration) -> Sleep {
    on_timers(|| tokio::time::sleep(duration))
}

/// [`tokio::time::sleep_until`].
pub fn sleep_until(deadline: Instant) -> Sleep {
    on_timers(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::timeout`].
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    on_timers(|| tokio::time::timeout(duration, future))
}

/// [`tokio::time::timeout_at`].
pub fn timeout_at<F: IntoFuture>(deadline: Instant, future: F) -> Timeout<F::IntoFuture> {
    on_timers(|| tokio::time::timeout_at(deadline, future))
}

/// A timer armed again for every wait of a series whose deadlines move later far more
/// often than they are reached: a session's idle and query timeouts. Arming it for a later
/// deadline than the one its timer is set for leaves the timer as it is: when that earlier
/// deadline comes, the wait looks at the clock and sets the timer for its own deadline.
/// So a wait that ends before its deadline (nearly every one) costs a clock reading and a
/// comparison, where a new timer for each wait is registered with the timer runtime and
/// taken out again, under its lock each way (about 1,700 instructions a `pgbench -S`
/// statement with every client timeout set: `TIMEOUTS=1
/// benches/instructions-per-statement.sh`). The timer itself is made on first use, boxed:
/// a session that sets no timeout carries one pointer.
#[derive(Debug, Default)]
pub struct Alarm(Option<Pin<Box<Sleep>>>);

impl Alarm {
    /// Resolves `timeout` from now; never if it is zero (off), at no cost.
    pub async fn after(&mut self, timeout: Duration) {
        if timeout.is_zero() {
            std::future::pending::<()>().await;
        } else {
            self.at(Instant::now() + timeout).await;
        }
    }

    /// Resolves at `deadline` (at once if that has passed).
    pub async fn at(&mut self, deadline: Instant) {
        let sleep = self
            .0
            .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            sleep.as_mut().await;
            if Instant::now() >= deadline {
                return;
            }
            // An earlier wait's deadline.
            sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime without a time driver, with this thread marked as a worker's.
    fn worker() -> tokio::runtime::Runtime {
        start_for_workers().expect("timer runtime");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        use_timer_runtime();
        runtime
    }

    #[test]
    fn timers_fire_on_a_runtime_without_a_time_driver() {
        let runtime = worker();
        runtime.block_on(async {
            let started = Instant::now();
            sleep(Duration::from_millis(20)).await;
            assert!(started.elapsed() >= Duration::from_millis(20));
            sleep_until(Instant::now() + Duration::from_millis(5)).await;
            let late = timeout(Duration::from_millis(10), std::future::pending::<()>()).await;
            assert!(late.is_err(), "a pending future times out");
            let early = timeout_at(Instant::now() + Duration::from_secs(5), async { 7 }).await;
            assert_eq!(early.ok(), Some(7));
        });
    }

    #[test]
    fn a_timer_dropped_before_it_fires_and_one_reset_both_work() {
        let runtime = worker();
        runtime.block_on(async {
            drop(sleep(Duration::from_secs(60)));
            let sleeping = sleep(Duration::from_secs(60));
            tokio::pin!(sleeping);
            sleeping
                .as_mut()
                .reset(Instant::now() + Duration::from_millis(5));
            sleeping.await;
        });
    }

    #[test]
    fn an_alarm_fires_at_its_latest_deadline_whether_moved_later_or_earlier() {
        let runtime = worker();
        runtime.block_on(async {
            let mut alarm = Alarm::default();
            // Off: never fires.
            let off = timeout(Duration::from_millis(20), alarm.after(Duration::ZERO)).await;
            assert!(off.is_err());
            // Armed, then moved later before it fires: it fires at the later deadline only.
            let started = Instant::now();
            let early = timeout(
                Duration::from_millis(10),
                alarm.after(Duration::from_millis(30)),
            )
            .await;
            assert!(early.is_err(), "not before its deadline");
            alarm.after(Duration::from_millis(60)).await;
            assert!(started.elapsed() >= Duration::from_millis(70));
            // Fired, then armed again, earlier than a pending deadline too.
            let again = Instant::now();
            let _ = timeout(
                Duration::from_millis(5),
                alarm.after(Duration::from_secs(60)),
            )
            .await;
            alarm.after(Duration::from_millis(15)).await;
            let took = again.elapsed();
            assert!(
                took >= Duration::from_millis(15) && took < Duration::from_secs(30),
                "{took:?}"
            );
            // A deadline already past resolves at once.
            alarm.at(Instant::now() - Duration::from_millis(1)).await;
        });
    }

    #[test]
    fn tokio_time_itself_is_missing_on_a_worker() {
        // What this module is for: a worker's runtime refuses tokio's own timers.
        let runtime = worker();
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(1)).await })
        }));
        assert!(refused.is_err());
    }

    #[test]
    fn no_code_that_may_run_on_a_worker_takes_its_timers_from_tokio() {
        // The main runtime (main.rs) has a time driver; everything in the library may run
        // on a worker.
        fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("src is readable") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    visit(&path, found);
                    continue;
                }
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !name.ends_with(".rs") || name == "main.rs" || name == "timer.rs" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("a source file");
                for (n, line) in text.lines().enumerate() {
                    let uses = ["sleep", "timeout", "interval"]
                        .iter()
                        .any(|f| line.contains(&format!("tokio::time::{f}")));
                    if uses {
                        found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        let mut found = Vec::new();
        visit(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "use crate::timer instead:\n{}",
            found.join("\n")
        );
    }
}
