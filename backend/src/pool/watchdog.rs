//! Whether the pool answers. A pool on a cluster filesystem can stop answering: its client died
//! (ENOTCONN), its storage fails (EIO), or a call never returns (a hung mount). The servers must
//! still answer then, and say why: every volume reports abnormal with the reason and the readiness
//! probe fails, within seconds, and no request waits on the mount without a bound.
//!
//! [`PoolHealth`] is what the background work on the pool (the node plugin's lease renewal, the
//! controller's lease watch) last saw, plus what a request that gave up on the pool reported. A
//! call on the pool that is still running past [`HUNG_AFTER`] counts as "not answering" by
//! itself: the watchdog does not need the call to come back to say so.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::error::Error;

/// How long a call on the pool may run before the pool counts as not answering.
pub const HUNG_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub(crate) struct PoolHealth {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The background call on the pool now running, and since when.
    running: Option<(&'static str, Instant)>,
    /// Why the last background call failed for the pool's sake; cleared by the next success.
    failing: Option<String>,
    /// A request that gave up waiting on the pool, and when; cleared by the next success.
    hung: Option<(String, Instant)>,
}

impl PoolHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f`, a call on the pool made by background work, as the watchdog's witness: while it
    /// runs for longer than [`HUNG_AFTER`] the pool is not answering; its error, when it is the
    /// pool's (see [`unreachable`]), is the reason until a later call succeeds.
    pub fn watch<T>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> crate::Result<T>,
    ) -> crate::Result<T> {
        self.state().running = Some((what, Instant::now()));
        let result = f();
        let mut s = self.state();
        s.running = None;
        match &result {
            Ok(_) => {
                s.failing = None;
                s.hung = None;
            }
            Err(e) => {
                if let Some(reason) = unreachable(e) {
                    s.failing = Some(reason);
                }
            }
        }
        result
    }

    /// A request gave up after waiting `waited` on the pool for `what`.
    pub fn note_hung(&self, what: &str, waited: Duration) {
        self.state().hung = Some((
            format!("{what} did not return within {:.1} s", waited.as_secs_f64()),
            Instant::now(),
        ));
    }

    /// A request's call on the pool failed the way only an unreachable pool fails.
    pub fn note_failure(&self, reason: String) {
        self.state().failing = Some(reason);
    }

    /// Why the pool does not answer, or None while it does (as far as anyone has seen).
    pub fn not_answering(&self) -> Option<String> {
        let s = self.state();
        if let Some((what, since)) = s.running {
            let running = since.elapsed();
            if running >= HUNG_AFTER {
                return Some(format!(
                    "the pool is not answering: {what} has not returned for {:.0} s",
                    running.as_secs_f64()
                ));
            }
        }
        if let Some(reason) = &s.failing {
            return Some(format!("the pool is not answering: {reason}"));
        }
        s.hung
            .as_ref()
            .map(|(what, _)| format!("the pool is not answering: {what}"))
    }
}

/// The errno of an I/O or system-call error, if it has one.
pub(crate) fn errno_of(e: &Error) -> Option<Errno> {
    match e {
        Error::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
        Error::Sys { source, .. } => Some(*source),
        _ => None,
    }
}

/// The reason, when `e` is how an unreachable pool fails: its cluster filesystem's client is gone
/// or cut off (ENOTCONN, the network errors), or its storage fails (EIO). A missing entry, a bad
/// record or a refusal is the pool answering.
pub(crate) fn unreachable(e: &Error) -> Option<String> {
    let errno = errno_of(e)?;
    matches!(
        errno,
        Errno::ENOTCONN
            | Errno::EIO
            | Errno::ETIMEDOUT
            | Errno::EHOSTDOWN
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::ECONNREFUSED
            | Errno::ECONNRESET
            | Errno::ECONNABORTED
            | Errno::ESHUTDOWN
            | Errno::ENODEV
    )
    .then(|| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Context;

    fn io(errno: Errno) -> Error {
        Err::<(), _>(std::io::Error::from_raw_os_error(errno as i32))
            .context(|| "read /p/volumes/v/volume.json".into())
            .unwrap_err()
    }

    #[test]
    fn which_errors_mean_the_pool_is_gone() {
        crate::table::check(
            [
                (io(Errno::ENOTCONN), true),
                (io(Errno::EIO), true),
                (io(Errno::ETIMEDOUT), true),
                (io(Errno::ENOENT), false),
                (io(Errno::EACCES), false),
                (io(Errno::ESTALE), false),
                (io(Errno::ENOSPC), false),
                (Error::precondition("staged elsewhere"), false),
                (Error::not_found("volume", "v"), false),
            ],
            |e| unreachable(e).is_some(),
        );
        let reason = unreachable(&io(Errno::ENOTCONN)).unwrap();
        assert!(
            reason.contains("volume.json") && reason.contains("not connected"),
            "{reason}"
        );
    }

    #[test]
    fn failures_and_hangs_until_a_success() {
        let h = PoolHealth::default();
        assert_eq!(h.not_answering(), None);
        let _ = h.watch("renew the lease", || Err::<(), _>(io(Errno::ENOENT)));
        assert_eq!(h.not_answering(), None, "a missing file is an answer");
        let _ = h.watch("renew the lease", || Err::<(), _>(io(Errno::ENOTCONN)));
        let reason = h.not_answering().unwrap();
        assert!(reason.contains("not connected"), "{reason}");
        h.watch("renew the lease", || Ok(())).unwrap();
        assert_eq!(h.not_answering(), None);
        h.note_hung("reading volume.json", Duration::from_secs(4));
        assert!(h.not_answering().unwrap().contains("within 4.0 s"));
        h.watch("renew the lease", || Ok(())).unwrap();
        assert_eq!(h.not_answering(), None);
        // A call still running past the bound, seen from another thread.
        h.state().running = Some(("renew the lease", Instant::now() - HUNG_AFTER));
        let reason = h.not_answering().unwrap();
        assert!(
            reason.contains("renew the lease has not returned"),
            "{reason}"
        );
    }
}
