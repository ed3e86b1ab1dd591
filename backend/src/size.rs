//! Volume sizes: what a request's range resolves to, for both front ends. Volumes come in whole
//! 4 KiB blocks (the loop device's logical block size), at least what their filesystem needs,
//! 1 GiB by default (or the source's size when copying one), never more than the caller's limit.

use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::validate::FsType;

/// The size of a volume created without a size (and without a source to copy).
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volumes are sized in whole blocks: a loop device needs a multiple of its block size.
pub const BLOCK: u64 = 4096;
/// Largest size a volume may have: what the CSI wire format (int64) and `off_t` can carry.
const MAX_SIZE: u64 = i64::MAX as u64;

/// The smallest volume `fs` can be formatted on (mkfs refuses less). No filesystem: one block.
pub fn min_size(fs: Option<FsType>) -> u64 {
    match fs {
        Some(FsType::Xfs) => 300 << 20,
        Some(FsType::Btrfs) => 128 << 20,
        Some(FsType::Ext4) | None => BLOCK,
    }
}

/// A size range in bytes, `0` meaning unset (CSI's `CapacityRange`; FlexVolume's `size` and
/// `expandfs` sizes are a `required` alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeRequest {
    pub required: u64,
    pub limit: u64,
}

impl SizeRequest {
    /// A range, refused (`OutOfRange`) when its limit is below its requirement.
    pub fn new(required: u64, limit: u64) -> Result<SizeRequest> {
        if limit != 0 && limit < required {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {limit} is smaller than required_bytes {required}"
            )));
        }
        Ok(SizeRequest { required, limit })
    }

    /// At least `bytes`, no limit.
    pub fn at_least(bytes: u64) -> SizeRequest {
        SizeRequest {
            required: bytes,
            limit: 0,
        }
    }

    /// Whether a volume of `size` bytes satisfies this range.
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }

    /// The size to make: `required` (or `default` when unset), at least `min`, in whole blocks,
    /// within the limit. `OutOfRange` when no such size exists.
    pub(crate) fn choose(&self, default: u64, min: u64) -> Result<u64> {
        let mut want = if self.required > 0 {
            self.required
        } else if self.limit > 0 {
            default.min(self.limit)
        } else {
            default
        };
        want = want.max(min);
        let too_big = || {
            Error::OutOfRange(format!(
                "{want} bytes is more than a volume can have (at most {} bytes)",
                MAX_SIZE / BLOCK * BLOCK
            ))
        };
        let mut size = round_up(want).ok_or_else(too_big)?;
        if size > MAX_SIZE {
            return Err(too_big());
        }
        if self.limit > 0 && size > self.limit {
            size = self.limit / BLOCK * BLOCK;
        }
        if size == 0 || size < self.required || size < min {
            return Err(Error::OutOfRange(format!(
                "no volume size fits required_bytes {} and limit_bytes {} (volumes come in \
                 whole {BLOCK}-byte blocks, and this filesystem needs at least {min} bytes)",
                self.required, self.limit
            )));
        }
        Ok(size)
    }
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|n| n / BLOCK * BLOCK)
}

/// The size of a new volume: the request, else the source's size (a copy), else the default; at
/// least the minimum of its filesystem.
pub(crate) fn for_create(
    req: SizeRequest,
    source_size: Option<u64>,
    fs: Option<FsType>,
) -> Result<u64> {
    req.choose(source_size.unwrap_or(DEFAULT_SIZE), min_size(fs))
}

/// The size volume `id` of `current` bytes grows to for `req` (unset: stays as it is, in whole
/// blocks). Volumes never shrink: a limit below the current size is `OutOfRange`.
pub(crate) fn for_expansion(id: &VolumeId, req: SizeRequest, current: u64) -> Result<u64> {
    if req.limit > 0 && current > req.limit {
        return Err(Error::OutOfRange(format!(
            "volume {id} already has {current} bytes, more than limit_bytes {}; volumes do not \
             shrink",
            req.limit
        )));
    }
    req.choose(current, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    const MIB: u64 = 1 << 20;

    /// Every row: (required, limit, default, min) → expected size, or None for OUT_OF_RANGE.
    #[test]
    fn choose() {
        let table: &[(u64, u64, u64, u64, Option<u64>)] = &[
            (0, 0, DEFAULT_SIZE, 0, Some(DEFAULT_SIZE)),
            (0, MIB, DEFAULT_SIZE, 0, Some(MIB)),
            (1, 0, DEFAULT_SIZE, 0, Some(4096)),
            (1000, 0, DEFAULT_SIZE, 0, Some(4096)),
            (1, 4096, DEFAULT_SIZE, 0, Some(4096)),
            (5000, 9000, DEFAULT_SIZE, 0, Some(8192)),
            (5000, 6000, DEFAULT_SIZE, 0, None),
            (MIB, 0, DEFAULT_SIZE, 300 * MIB, Some(300 * MIB)),
            (MIB, 2 * MIB, DEFAULT_SIZE, 300 * MIB, None),
            (0, 0, DEFAULT_SIZE, 300 * MIB, Some(DEFAULT_SIZE)),
            (0, 0, 5000, 0, Some(8192)),
            (u64::MAX, 0, DEFAULT_SIZE, 0, None),
            (MAX_SIZE, 0, DEFAULT_SIZE, 0, None),
            (
                MAX_SIZE - BLOCK * 2,
                0,
                DEFAULT_SIZE,
                0,
                Some((MAX_SIZE / BLOCK - 1) * BLOCK),
            ),
            (MAX_SIZE - 1, 0, DEFAULT_SIZE, 0, None),
        ];
        let mut wrong = Vec::new();
        for &(required, limit, default, min, want) in table {
            let req = SizeRequest { required, limit };
            let got = req.choose(default, min);
            let ok = match (&got, want) {
                (Ok(size), Some(w)) => *size == w,
                (Err(e), None) => e.kind() == ErrorKind::OutOfRange,
                _ => false,
            };
            if !ok {
                wrong.push(format!(
                    "({required}, {limit}, {default}, {min}): got {got:?}, want {want:?}"
                ));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn ranges() {
        assert_eq!(
            SizeRequest::new(10, 5).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        SizeRequest::new(10, 0).unwrap();
        SizeRequest::new(10, 10).unwrap();
        let r = SizeRequest::new(10, 20).unwrap();
        assert!(r.admits(15) && r.admits(10) && r.admits(20));
        assert!(!r.admits(21) && !r.admits(9));
        assert!(SizeRequest::at_least(10).admits(1 << 40));
        assert!(SizeRequest::default().admits(0));
    }

    /// A size no volume can have is refused naming it and the largest one, whether it was asked
    /// for or comes from a source (a snapshot recorded at 2^63 bytes).
    #[test]
    fn too_large_names_the_size_and_the_limit() {
        let max = (MAX_SIZE / BLOCK * BLOCK).to_string();
        for (req, source) in [
            (SizeRequest::default(), Some(1u64 << 63)),
            (SizeRequest::at_least(1 << 63), None),
            (SizeRequest::at_least(u64::MAX), None),
        ] {
            let err = for_create(req, source, None).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.kind(), ErrorKind::OutOfRange, "{msg}");
            let asked = source.unwrap_or(req.required).to_string();
            assert!(msg.contains(&asked) && msg.contains(&max), "{msg}");
        }
    }

    /// FlexVolume's `size` and CSI's range follow the same rules: (request, source size, fs)
    /// → size, or None for OUT_OF_RANGE.
    #[test]
    fn create_sizes() {
        type Row = (SizeRequest, Option<u64>, Option<FsType>, Option<u64>);
        let table: &[Row] = &[
            // FlexVolume `size: "1000"`: a whole block.
            (SizeRequest::at_least(1000), None, None, Some(4096)),
            (
                SizeRequest::at_least(1000),
                None,
                Some(FsType::Ext4),
                Some(4096),
            ),
            // xfs below its minimum is raised to it, as CSI always did.
            (
                SizeRequest::at_least(64 * MIB),
                None,
                Some(FsType::Xfs),
                Some(300 * MIB),
            ),
            (
                SizeRequest::at_least(64 * MIB),
                None,
                Some(FsType::Btrfs),
                Some(128 * MIB),
            ),
            (SizeRequest::default(), None, None, Some(DEFAULT_SIZE)),
            // A copy defaults to its source's size.
            (
                SizeRequest::default(),
                Some(320 * MIB),
                None,
                Some(320 * MIB),
            ),
            (
                SizeRequest::at_least(400 * MIB),
                Some(320 * MIB),
                None,
                Some(400 * MIB),
            ),
            (
                SizeRequest {
                    required: 0,
                    limit: MIB,
                },
                None,
                Some(FsType::Xfs),
                None,
            ),
        ];
        let rows = table
            .iter()
            .map(|&(req, source, fs, want)| ((req, source, fs), want));
        crate::table::check(rows, |&(req, source, fs)| for_create(req, source, fs).ok());
    }

    #[test]
    fn expansion_sizes() {
        let id = VolumeId::try_from("v").unwrap();
        // (request, current) → size, or None for OUT_OF_RANGE.
        let table: &[(SizeRequest, u64, Option<u64>)] = &[
            (SizeRequest::at_least(2 * MIB), MIB, Some(2 * MIB)),
            (
                SizeRequest::at_least(2 * MIB + 1),
                MIB,
                Some(2 * MIB + 4096),
            ),
            (SizeRequest::default(), MIB, Some(MIB)),
            // Smaller than now: the caller sees the current size (never shrinks).
            (SizeRequest::at_least(4096), MIB, Some(4096)),
            (
                SizeRequest {
                    required: 0,
                    limit: MIB / 2,
                },
                MIB,
                None,
            ),
            (
                SizeRequest {
                    required: MIB,
                    limit: 2 * MIB,
                },
                MIB,
                Some(MIB),
            ),
        ];
        let rows = table
            .iter()
            .map(|&(req, current, want)| ((req, current), want));
        crate::table::check(rows, |&(req, current)| {
            for_expansion(&id, req, current).ok()
        });
        let err = for_expansion(
            &id,
            SizeRequest {
                required: 0,
                limit: 1,
            },
            MIB,
        )
        .unwrap_err();
        assert!(err.to_string().contains("do not shrink"), "{err}");
    }
}
