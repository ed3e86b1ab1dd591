//! Test data on volumes: one deterministic pattern, durable writes, filesystem sizes.

use std::io::Write;
use std::path::Path;

/// `len` bytes of deterministic, incompressible data (xorshift64*), different for each `seed`:
/// what a test writes through one path and compares through another.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    // Any seed works: the odd constant keeps the state from being 0, where xorshift sticks.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` to a new file `path` and fsyncs it and its directory: it is on the volume's
/// image when this returns, whatever is unmounted or detached next.
pub fn write_synced(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    let dir = path.parent().expect("a file in a directory");
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// The size in bytes of the filesystem mounted at `path` (statvfs).
pub fn fs_size(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    // Both are c_ulong-sized aliases: u64 on the platforms loopvol runs on.
    st.blocks() as u64 * st.fragment_size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_distinct_and_not_trivial() {
        assert_eq!(pattern(1000, 7), pattern(1000, 7));
        assert_eq!(pattern(10, 7)[..], pattern(1000, 7)[..10]);
        assert_ne!(pattern(1000, 7), pattern(1000, 8));
        assert_ne!(pattern(64, 0), vec![0; 64]);
        // Every byte value appears in a few KiB: data no filesystem stores as a hole or a repeat.
        let p = pattern(64 * 1024, 1);
        let mut seen = [false; 256];
        p.iter().for_each(|&b| seen[usize::from(b)] = true);
        assert!(seen.iter().all(|&s| s));
    }
}
