//! Copying images for snapshots and clones: a reflink when the pool's filesystem can (xfs, btrfs:
//! instant, no space), else a copy of the data extents only, so holes stay holes.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Context, Result};
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

/// Copies `src` into the new file `dest` (which must not exist) and fsyncs it.
pub fn copy_image(src: &Path, dest: &Path) -> Result<CopyMethod> {
    let input = File::open(src).context(|| format!("open {}", src.display()))?;
    let output = File::options()
        .write(true)
        .create_new(true)
        .open(dest)
        .context(|| format!("create {}", dest.display()))?;
    let method = match sys::ficlone(output.as_fd(), input.as_fd()) {
        Ok(()) => CopyMethod::Reflink,
        Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY) => {
            sparse_copy(&input, &output)
                .context(|| format!("copy {} to {}", src.display(), dest.display()))?;
            CopyMethod::Sparse
        }
        Err(e) => {
            return Err(e).context(|| format!("reflink {} to {}", src.display(), dest.display()))
        }
    };
    output
        .sync_all()
        .context(|| format!("fsync {}", dest.display()))?;
    Ok(method)
}

/// Walks the data extents with SEEK_DATA/SEEK_HOLE and copies each with copy_file_range (which
/// the kernel may itself accelerate); the destination gets the same length and the same holes.
fn sparse_copy(input: &File, output: &File) -> std::io::Result<()> {
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(input.as_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(input.as_fd(), data, Whence::SeekHole)?;
        let mut off_in = data;
        let mut off_out = data;
        let mut remaining = (hole - data) as usize;
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
        }
        pos = hole;
    }
    Ok(())
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
        copy_image(&src, &dest).unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dest).unwrap();
        assert_eq!(a, b);
        // Allocated blocks stay near the data size (1 MiB + two small writes), not 64 MiB.
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
        assert!(
            copy_image(&src, &dest).is_err(),
            "dest must not be overwritten"
        );
    }
}
