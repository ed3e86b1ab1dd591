//! Waiting for a condition instead of sleeping: poll it, quickly at first, within a bound.

use std::future::Future;
use std::time::{Duration, Instant};

/// What a polled check returns: `bool` (done or not), or `Option<T>` (done with a value).
pub trait Outcome {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Delays between checks: 1 ms, doubling to 16 ms (a condition that holds soon is seen soon,
/// one that takes seconds costs little CPU).
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(1 << attempt.min(4))
}

/// Polls `check` until it is ready and returns its value; fails naming `what` when `within`
/// passes first. `check` may panic itself to fail early (a process it waits for died).
#[track_caller]
pub fn poll_until<O: Outcome>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> O,
) -> O::Value {
    let deadline = Instant::now() + within;
    for attempt in 0.. {
        if let Some(value) = check().ready() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(backoff(attempt));
    }
    unreachable!()
}

/// [`poll_until`] for async checks (a gRPC call); sleeps without blocking the runtime.
pub async fn poll_until_async<O: Outcome, F: Future<Output = O>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> O::Value {
    let deadline = Instant::now() + within;
    for attempt in 0.. {
        if let Some(value) = check().await.ready() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(backoff(attempt)).await;
    }
    unreachable!()
}
