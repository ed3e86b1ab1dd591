//! Copying images for snapshots and clones: a reflink when the pool's filesystem can (xfs, btrfs:
//! instant, no space), else a copy of the data extents only, so holes stay holes.

use std::fs::File;
use std::os::fd::AsFd;

use nix::errno::Errno;

use crate::error::{Context, Result};
use crate::extents;
use crate::observe::{self, CopyKind};
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

impl CopyMethod {
    pub const ALL: [CopyMethod; 2] = [CopyMethod::Reflink, CopyMethod::Sparse];

    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::Sparse => "sparse",
        }
    }
}

/// Makes `output` (a new, empty file open for writing) share every block of `input`: instant,
/// and no space taken now. `Ok(false)` when the pool's filesystem cannot (then [`copy_data`]).
/// `what` names the copy in messages ("volume a to snapshot b"); `kind` says why it is made
/// (for the metrics).
pub(crate) fn reflink(input: &File, output: &File, kind: CopyKind, what: &str) -> Result<bool> {
    let start = std::time::Instant::now();
    match sys::ficlone(output.as_fd(), input.as_fd()) {
        Ok(()) => {
            // The data now shared: what a copy would have moved.
            let shared = input
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512))
                .unwrap_or(0);
            observe::copy(kind, CopyMethod::Reflink, shared, start.elapsed());
            Ok(true)
        }
        Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY) => Ok(false),
        Err(e) => Err(e).context(|| format!("reflink {what}")),
    }
}

/// Allocates in `output` every range where `input` holds data (fallocate, nothing written):
/// the space a [`copy_data`] of it will take is taken now, so it can be admitted and held
/// before the data moves. Returns the bytes allocated.
pub(crate) fn preallocate(input: &File, output: &File, what: &str) -> Result<u64> {
    let mut total = 0u64;
    for range in extents::data_ranges(input).context(|| format!("map {what}"))? {
        let (start, end) = range.context(|| format!("map {what}"))?;
        crate::volume::fallocate(output, start, end - start)?;
        total = total.saturating_add(end - start);
    }
    Ok(total)
}

/// Copies the data extents of `input` into `output` with copy_file_range (which the kernel may
/// itself accelerate); `output` becomes at least as long as `input`, with the same holes.
pub(crate) fn copy_data(input: &File, output: &File, kind: CopyKind, what: &str) -> Result<()> {
    let start = std::time::Instant::now();
    let mut copied = 0u64;
    let ctx = || format!("copy {what}");
    let len = input.metadata().context(ctx)?.len();
    // Never shorter: a caller may have sized (and so reserved) the output beyond the input.
    if output.metadata().context(ctx)?.len() < len {
        output.set_len(len).context(ctx)?;
    }
    for range in extents::data_ranges(input).context(ctx)? {
        let (start, end) = range.context(ctx)?;
        let (mut off_in, mut off_out) = (as_offset(start)?, as_offset(start)?);
        let mut remaining = end - start;
        while remaining > 0 {
            let chunk = usize::try_from(remaining.min(1 << 30)).unwrap_or(1 << 30);
            let n = nix::fcntl::copy_file_range(
                input.as_fd(),
                Some(&mut off_in),
                output.as_fd(),
                Some(&mut off_out),
                chunk,
            )
            .context(ctx)?;
            if n == 0 {
                break; // the source shrank under us; the length is already set
            }
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            remaining = remaining.saturating_sub(n);
            copied = copied.saturating_add(n);
        }
    }
    observe::copy(kind, CopyMethod::Sparse, copied, start.elapsed());
    Ok(())
}

fn as_offset(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| crate::Error::OutOfRange(format!("offset {n} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 32 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        f.sync_all().unwrap();
        let dest = dir.path().join("dest");
        let output = File::options()
            .write(true)
            .create_new(true)
            .open(&dest)
            .unwrap();
        copy_data(
            &File::open(&src).unwrap(),
            &output,
            CopyKind::Clone,
            "src to dest",
        )
        .unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dest).unwrap();
        assert_eq!(a, b);
        // Allocated blocks stay near the data size (1 MiB + two small writes), not 64 MiB.
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
    }
}
