//! A workload that writes and syncs, for the fencing tests: what it was told is durable must be
//! there after the fence, wherever the volume is read next.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::data::pattern;
use crate::poll::{poll_until, poll_until_async};

/// The workload's unit: each block is synced before the next is written.
pub const BLOCK: usize = 64 * 1024;

/// Appends pattern blocks to one file, fsyncing (`fdatasync`) each, until a write or sync fails
/// (the fence) or it is dropped. [`Workload::synced`] counts the blocks the kernel said are
/// durable.
pub struct Workload {
    synced: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<std::io::Error>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workload {
    /// Starts writing `path` (created, or truncated), as fast as it can (a pause of 2 ms
    /// between blocks).
    pub fn start(path: PathBuf) -> Workload {
        Workload::paced(path, Duration::from_millis(2))
    }

    /// [`Workload::start`], pausing `pause` between blocks (a volume must hold what it writes
    /// for as long as it runs).
    pub fn paced(path: PathBuf, pause: Duration) -> Workload {
        let synced = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let (s, st, e) = (Arc::clone(&synced), Arc::clone(&stop), Arc::clone(&error));
        let thread = std::thread::spawn(move || {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("open the workload's file");
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                let write = file
                    .write_all_at(&pattern(BLOCK, n), n * BLOCK as u64)
                    .and_then(|()| file.sync_data());
                match write {
                    Ok(()) => {
                        n += 1;
                        s.store(n, Ordering::SeqCst);
                    }
                    Err(err) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                        return;
                    }
                }
                std::thread::sleep(pause);
            }
        });
        Workload {
            synced,
            stop,
            error,
            thread: Some(thread),
        }
    }

    /// Blocks synced so far.
    pub fn synced(&self) -> u64 {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The error that stopped it, once it failed.
    fn finish(&mut self) -> (u64, String) {
        if let Some(t) = self.thread.take() {
            t.join().expect("the workload's thread");
        }
        let err = self.error.lock().unwrap_or_else(|p| p.into_inner());
        (
            self.synced(),
            err.as_ref().map(ToString::to_string).unwrap_or_default(),
        )
    }

    /// Waits (bounded) until the workload failed; returns the blocks it synced and its error.
    pub fn wait_failed(&mut self, within: Duration) -> (u64, String) {
        poll_until(within, "the workload failing", || self.failed());
        self.finish()
    }

    /// [`Workload::wait_failed`] without blocking an async runtime.
    pub async fn wait_failed_async(&mut self, within: Duration) -> (u64, String) {
        poll_until_async(within, "the workload failing", || {
            std::future::ready(self.failed())
        })
        .await;
        self.finish()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // A workload stuck in a hung mount is left to the process's end.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Fails unless `got` (the workload's file, read back) holds the `synced` blocks it wrote.
#[track_caller]
pub fn assert_synced_blocks(got: &[u8], synced: u64, what: &str) {
    assert!(
        got.len() as u64 >= synced * BLOCK as u64,
        "{what}: {synced} blocks were synced, {} bytes are there",
        got.len()
    );
    for n in 0..synced {
        let at = usize::try_from(n).unwrap() * BLOCK;
        assert!(
            got[at..at + BLOCK] == pattern(BLOCK, n)[..],
            "{what}: block {n} of the {synced} synced differs"
        );
    }
}
