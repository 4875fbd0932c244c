//! A stop signal a session can wait on at every await point, cheaply.
//!
//! A session waits for its client (or its server) together with pgway's shutdown, the
//! console's `KILL_CLIENT` and the hard stop, once per statement or more. Polling a
//! [`CancellationToken`]'s future takes two locks each time (its tree's, to see whether it
//! is cancelled, and its `Notify`'s, to store the waker again), even though nothing
//! changed. [`StopSignal`] polls that future only when it may have something new: on the
//! first poll, when the task polling it changes, and after the token itself woke it.
//! Every other poll is a waker comparison and one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::sync::lock;

/// Resolves once its token is cancelled (see the module documentation).
pub(super) struct StopSignal {
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Woken by the token's future, it notes that and wakes the waiting task.
    relay: Arc<Relay>,
    /// `relay` as a waker, made once.
    relay_waker: Waker,
    /// The task the relay wakes, as last stored in it.
    task: Option<Waker>,
}

#[derive(Default)]
struct Relay {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = lock(&self.task).as_ref() {
            task.wake_by_ref();
        }
    }
}

impl StopSignal {
    pub(super) fn new(token: CancellationToken) -> Self {
        let relay = Arc::new(Relay::default());
        Self {
            cancelled: Box::pin(token.cancelled_owned()),
            relay_waker: Waker::from(Arc::clone(&relay)),
            relay,
            task: None,
        }
    }
}

impl std::fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignal").finish_non_exhaustive()
    }
}

impl Future for StopSignal {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let same_task = this
            .task
            .as_ref()
            .is_some_and(|task| task.will_wake(cx.waker()));
        if same_task && !this.relay.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !same_task {
            let task = cx.waker().clone();
            *lock(&this.relay.task) = Some(task.clone());
            this.task = Some(task);
        }
        // Cleared before the look: a cancellation from here on sets it again.
        this.relay.woken.store(false, Ordering::Release);
        this.cancelled
            .as_mut()
            .poll(&mut Context::from_waker(&this.relay_waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_its_task_once_cancelled_and_then_resolves() {
        let token = CancellationToken::new();
        let mut stop = StopSignal::new(token.child_token());
        let count = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut stop).poll(&mut cx).is_pending());
        // Polled again without news: still pending, and no wake.
        assert!(Pin::new(&mut stop).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        token.cancel();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut stop).poll(&mut cx).is_ready());
    }

    #[test]
    fn a_new_task_is_woken_instead_of_the_old_one() {
        let token = CancellationToken::new();
        let mut stop = StopSignal::new(token.clone());
        let (old, new) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let old_waker = Waker::from(Arc::clone(&old));
        let new_waker = Waker::from(Arc::clone(&new));
        assert!(Pin::new(&mut stop)
            .poll(&mut Context::from_waker(&old_waker))
            .is_pending());
        assert!(Pin::new(&mut stop)
            .poll(&mut Context::from_waker(&new_waker))
            .is_pending());
        token.cancel();
        assert_eq!(old.0.load(Ordering::SeqCst), 0);
        assert_eq!(new.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut stop)
            .poll(&mut Context::from_waker(&new_waker))
            .is_ready());
    }

    #[test]
    fn a_token_cancelled_before_the_first_poll_resolves_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        let mut stop = StopSignal::new(token);
        let waker = Waker::noop();
        assert!(Pin::new(&mut stop)
            .poll(&mut Context::from_waker(waker))
            .is_ready());
    }
}
