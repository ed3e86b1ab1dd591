//! What an image's blocks are: where its data is (`SEEK_DATA`/`SEEK_HOLE`) and how much of its
//! allocation is its own rather than shared with a snapshot or a clone (`FIEMAP`). The space
//! model (`pool::capacity`), copies (`copy`) and the format plan's "holds no data" witness read
//! files through these; the files themselves are opened by `pool::fsops`.
//!
//! On ext4, xfs and btrfs an allocated but never written (fallocated) range reads as a hole to
//! `SEEK_DATA`: a thick image that was never written holds no data, exactly like a thin one.

use std::fs::File;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::sys;

/// The byte ranges `[start, end)` of `file` that hold data, in order.
pub(crate) struct DataRanges<'f> {
    file: &'f File,
    pos: u64,
    len: u64,
}

impl Iterator for DataRanges<'_> {
    type Item = std::io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let step = || -> std::io::Result<Option<(u64, u64)>> {
            let from = offset(self.pos)?;
            let data = match lseek(self.file.as_fd(), from, Whence::SeekData) {
                Ok(off) => off,
                Err(Errno::ENXIO) => return Ok(None), // only a hole remains
                Err(e) => return Err(e.into()),
            };
            let hole = lseek(self.file.as_fd(), data, Whence::SeekHole)?;
            let (data, hole) = (bytes(data)?, bytes(hole)?.min(self.len));
            Ok((data < hole).then_some((data, hole)))
        };
        match step() {
            Ok(Some((data, hole))) => {
                self.pos = hole;
                Some(Ok((data, hole)))
            }
            Ok(None) => {
                self.pos = self.len;
                None
            }
            Err(e) => {
                self.pos = self.len;
                Some(Err(e))
            }
        }
    }
}

fn offset(n: u64) -> std::io::Result<i64> {
    i64::try_from(n).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

fn bytes(n: i64) -> std::io::Result<u64> {
    u64::try_from(n).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
}

/// The data ranges of `file`, up to its current length.
pub(crate) fn data_ranges(file: &File) -> std::io::Result<DataRanges<'_>> {
    Ok(DataRanges {
        file,
        pos: 0,
        len: file.metadata()?.len(),
    })
}

/// How many bytes of `file` hold data (written, not holes or never-written allocations).
pub(crate) fn data_bytes(file: &File) -> std::io::Result<u64> {
    data_ranges(file)?.try_fold(0u64, |sum, range| {
        let (start, end) = range?;
        Ok(sum.saturating_add(end - start))
    })
}

/// How many bytes within the first `len` of `file` are allocated to it alone: neither shared
/// with another file (a reflinked snapshot or clone) nor still waiting for allocation. A write
/// over them needs no new space. `None` when the filesystem cannot map extents (then nothing
/// can tell shared blocks apart, and the caller falls back to the allocated block count).
pub(crate) fn own_bytes(file: &File, len: u64) -> std::io::Result<Option<u64>> {
    let mut own = 0u64;
    let mut start = 0u64;
    let mut batch = Vec::new();
    while start < len {
        match sys::fiemap(file.as_fd(), start, &mut batch) {
            Ok(()) => {}
            Err(Errno::EOPNOTSUPP | Errno::ENOTTY) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let Some(last) = batch.last() else { break };
        for e in &batch {
            let from = e.fe_logical.max(start);
            let to = e.fe_logical.saturating_add(e.fe_length).min(len);
            let not_own = sys::FIEMAP_EXTENT_SHARED | sys::FIEMAP_EXTENT_UNKNOWN;
            if to > from && e.fe_flags & not_own == 0 {
                own = own.saturating_add(to - from);
            }
        }
        if last.fe_flags & sys::FIEMAP_EXTENT_LAST != 0 {
            break;
        }
        let next = last.fe_logical.saturating_add(last.fe_length);
        if next <= start {
            break; // no progress: never loop on a confused filesystem
        }
        start = next;
    }
    Ok(Some(own))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_ranges_and_own_bytes_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        assert_eq!(data_bytes(&f).unwrap(), 0);
        f.write_all_at(&[1u8; 1 << 20], 4 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], (16 << 20) - 4096).unwrap();
        f.sync_all().unwrap();
        let ranges: Vec<(u64, u64)> = data_ranges(&f).unwrap().map(Result::unwrap).collect();
        assert_eq!(ranges, [(4 << 20, 5 << 20), ((16 << 20) - 4096, 16 << 20)]);
        assert_eq!(data_bytes(&f).unwrap(), (1 << 20) + 4096);
        // Nothing shares this file's blocks: all of its allocation is its own (where the
        // filesystem maps extents at all; tmpfs does not).
        if let Some(own) = own_bytes(&f, 16 << 20).unwrap() {
            assert_eq!(own, (1 << 20) + 4096);
        }
    }
}
