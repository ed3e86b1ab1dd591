//! Copying images for snapshots and clones: a reflink when the pool's filesystem can (xfs, btrfs:
//! instant, no space), else a copy of the data extents only, so holes stay holes.

use std::fs::File;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Context, Result};
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

/// Copies the image open as `input` into `output` (a new, empty file opened for writing) and
/// fsyncs it. `what` names the copy in messages ("volume a to snapshot b"); `kind` says why it
/// is made (for the metrics).
pub(crate) fn copy_image(
    input: &File,
    output: &File,
    kind: CopyKind,
    what: &str,
) -> Result<CopyMethod> {
    let start = std::time::Instant::now();
    let (method, bytes) = match sys::ficlone(output.as_fd(), input.as_fd()) {
        // The data now shared: what a copy would have moved.
        Ok(()) => (
            CopyMethod::Reflink,
            input
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512))
                .unwrap_or(0),
        ),
        Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY) => {
            let copied = sparse_copy(input, output).context(|| format!("copy {what}"))?;
            (CopyMethod::Sparse, copied)
        }
        Err(e) => return Err(e).context(|| format!("reflink {what}")),
    };
    output.sync_all().context(|| format!("fsync copy {what}"))?;
    observe::copy(kind, method, bytes, start.elapsed());
    Ok(method)
}

/// Walks the data extents with SEEK_DATA/SEEK_HOLE and copies each with copy_file_range (which
/// the kernel may itself accelerate); the destination gets the same length and the same holes.
/// Returns the bytes copied.
fn sparse_copy(input: &File, output: &File) -> std::io::Result<u64> {
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let mut copied: u64 = 0;
    let mut pos: i64 = 0;
    while u64::try_from(pos).is_ok_and(|p| p < len) {
        let data = match lseek(input.as_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(input.as_fd(), data, Whence::SeekHole)?;
        let mut off_in = data;
        let mut off_out = data;
        let mut remaining = usize::try_from(hole - data)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        while remaining > 0 {
            let n = nix::fcntl::copy_file_range(
                input.as_fd(),
                Some(&mut off_in),
                output.as_fd(),
                Some(&mut off_out),
                remaining.min(1 << 30),
            )?;
            if n == 0 {
                break; // the source shrank under us; the length is already set
            }
            remaining -= n;
            copied = copied.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        }
        pos = hole;
    }
    Ok(copied)
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
        let method = copy_image(
            &File::open(&src).unwrap(),
            &output,
            CopyKind::Clone,
            "src to dest",
        )
        .unwrap();
        let _ = method; // reflink or sparse: whatever the temp dir's filesystem offers
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dest).unwrap();
        assert_eq!(a, b);
        // Allocated blocks stay near the data size (1 MiB + two small writes), not 64 MiB.
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
    }
}
