//! What the pool can still promise: free space, what thin volumes were promised and have not
//! taken yet, and the overcommit factor.

use crate::error::{Error, Result};

use super::Pool;

/// Capacity as the controller reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Free bytes of the pool's filesystem.
    pub free_bytes: u64,
    /// Bytes thin volumes may still write (their size minus what they already allocated).
    pub thin_unallocated_bytes: u64,
    /// What a new volume may still claim: free × overcommit − thin_unallocated, at least 0.
    pub available_bytes: u64,
}

impl Pool {
    /// Free space, what thin volumes may still claim, and what is left to promise.
    pub fn capacity(&self) -> Result<Capacity> {
        let fs = self.fs()?;
        let free = fs.free_bytes()?;
        // An image's length is its volume's size, so one stat per volume tells what it may still
        // claim: no metadata is read, and a create stays cheap in a pool of thousands of volumes.
        // A planted entry is no volume's image: it promises nothing.
        let unallocated: u64 = self
            .volume_images()?
            .iter()
            .map(|st| st.len.saturating_sub(st.allocated))
            .fold(0, u64::saturating_add);
        Ok(Capacity {
            free_bytes: free,
            thin_unallocated_bytes: unallocated,
            available_bytes: promisable(free, self.options.overcommit).saturating_sub(unallocated),
        })
    }

    /// Fails with `NoSpace` unless `bytes` more can be promised.
    pub(crate) fn ensure_room(&self, bytes: u64, for_what: &str) -> Result<()> {
        let cap = self.capacity()?;
        if bytes > cap.available_bytes {
            return Err(Error::NoSpace(format!(
                "{for_what} needs {bytes} bytes but the pool {} can promise only {} \
                 ({} free, {} already promised to thin volumes, overcommit {})",
                self.root.display(),
                cap.available_bytes,
                cap.free_bytes,
                cap.thin_unallocated_bytes,
                self.options.overcommit
            )));
        }
        Ok(())
    }
}

/// `free × overcommit`, in bytes (saturating: a factor this large promises everything).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a byte count far below 2^53 and a factor ≥ 1: the float product is exact enough, \
              and `as` saturates at u64::MAX"
)]
fn promisable(free: u64, overcommit: f64) -> u64 {
    (free as f64 * overcommit) as u64
}
