//! The in-memory set of operations in flight, keyed by volume, snapshot or group: a second call
//! on a key that is busy answers ABORTED at once (the CO retries with backoff) instead of queuing
//! behind the first. Calls on different keys run in parallel. The backend's file locks (taken
//! with `LockWait::Try`) give the same answer across processes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use loopvol::{GroupSnapshotId, SnapshotId, VolumeId};
use tonic::Status;

#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Holds its keys until dropped. Moved into the blocking task, so a caller that gives up (its
/// deadline passes, the connection drops) does not release a volume whose work is still running.
#[derive(Debug)]
pub struct Guard {
    set: InFlight,
    keys: Vec<String>,
}

impl InFlight {
    /// Takes every key in `keys` or none: ABORTED when any is held.
    pub fn acquire(&self, keys: Vec<String>) -> Result<Guard, Status> {
        let mut held = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(Status::aborted(format!(
                "an operation on {busy} is already in progress; retry later"
            )));
        }
        for k in &keys {
            held.insert(k.clone());
        }
        Ok(Guard {
            set: self.clone(),
            keys,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut held = self.set.keys.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
    }
}

/// The key of a volume.
pub fn volume(id: &VolumeId) -> String {
    format!("volume {id}")
}

/// The key of a snapshot.
pub fn snapshot(id: &SnapshotId) -> String {
    format!("snapshot {id}")
}

/// The key of a group snapshot.
pub fn group(id: &GroupSnapshotId) -> String {
    format!("group snapshot {id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(id: &str) -> String {
        super::volume(&VolumeId::try_from(id).unwrap())
    }

    fn snapshot(id: &str) -> String {
        super::snapshot(&SnapshotId::try_from(id).unwrap())
    }

    #[test]
    fn second_call_on_a_key_is_aborted_until_the_first_ends() {
        let set = InFlight::default();
        let first = set.acquire(vec![volume("a")]).unwrap();
        let err = set.acquire(vec![volume("a")]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(err.message().contains("volume a"), "{}", err.message());
        // Other keys are independent.
        let other = set.acquire(vec![volume("b"), snapshot("a")]).unwrap();
        drop(first);
        set.acquire(vec![volume("a")]).unwrap();
        drop(other);
        assert_eq!(set.len(), 0);
    }

    #[test]
    fn all_or_nothing() {
        let set = InFlight::default();
        let _b = set.acquire(vec![volume("b")]).unwrap();
        assert!(set.acquire(vec![volume("a"), volume("b")]).is_err());
        // "a" was not left behind by the failed attempt.
        set.acquire(vec![volume("a")]).unwrap();
    }
}
