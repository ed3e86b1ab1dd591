//! Request parameters (StorageClass `parameters`, VolumeAttributesClass `mutable_parameters`,
//! VolumeSnapshotClass `parameters`) and capacity ranges. Unknown keys are refused, except the
//! metadata keys Kubernetes sidecars add with `--extra-create-metadata`.

use std::collections::HashMap;

use loopvol::{Allocation, FsType};
use tonic::Status;

use crate::error::invalid;

/// The size of a volume created without a capacity range (and without a source to copy).
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volumes are sized in whole 4 KiB blocks (loop devices need a multiple of their block size).
pub const BLOCK: u64 = 4096;
/// CSI's bound on a map's total size.
const MAX_MAP_BYTES: usize = 4096;

const FS_TYPE_KEYS: [&str; 2] = ["csi.storage.k8s.io/fstype", "fsType"];
const ALLOCATION_KEY: &str = "allocation";

/// Metadata keys external-provisioner adds; they describe the PV/PVC and configure nothing.
const VOLUME_METADATA: [&str; 2] = ["csi.storage.k8s.io/pv/", "csi.storage.k8s.io/pvc/"];
/// Metadata keys external-snapshotter adds to snapshot and group snapshot requests.
const SNAPSHOT_METADATA: [&str; 4] = [
    "csi.storage.k8s.io/volumesnapshot/",
    "csi.storage.k8s.io/volumesnapshotcontent/",
    "csi.storage.k8s.io/volumegroupsnapshot/",
    "csi.storage.k8s.io/volumegroupsnapshotcontent/",
];

fn check_size(what: &str, map: &HashMap<String, String>) -> Result<(), Status> {
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_MAP_BYTES {
        return Err(invalid(format!(
            "{what} hold {bytes} bytes, more than {MAX_MAP_BYTES}"
        )));
    }
    Ok(())
}

fn is_metadata(key: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| key.starts_with(p))
}

/// What CreateVolume's parameters ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeParams {
    pub fs_type: Option<FsType>,
    pub allocation: Option<Allocation>,
}

fn parse_allocation(v: &str) -> Result<Allocation, Status> {
    v.parse::<Allocation>()
        .map_err(|e| invalid(format!("parameter {ALLOCATION_KEY}: {e}")))
}

/// Parses CreateVolume's `parameters` and `mutable_parameters` (the latter may set only what
/// ControllerModifyVolume can change later, and wins over the former).
pub fn volume(
    params: &HashMap<String, String>,
    mutable: &HashMap<String, String>,
) -> Result<VolumeParams, Status> {
    check_size("parameters", params)?;
    let mut out = VolumeParams::default();
    for (k, v) in params {
        if FS_TYPE_KEYS.contains(&k.as_str()) {
            if v.is_empty() {
                continue; // no preference
            }
            let fs = v
                .parse::<FsType>()
                .map_err(|e| invalid(format!("parameter {k}: {e}")))?;
            if out.fs_type.is_some_and(|have| have != fs) {
                return Err(invalid(format!(
                    "parameters {} and {} disagree",
                    FS_TYPE_KEYS[0], FS_TYPE_KEYS[1]
                )));
            }
            out.fs_type = Some(fs);
        } else if k == ALLOCATION_KEY {
            out.allocation = Some(parse_allocation(v)?);
        } else if !is_metadata(k, &VOLUME_METADATA) {
            return Err(invalid(format!(
                "unknown parameter {k:?} (loopvol knows {}, {} and {ALLOCATION_KEY})",
                FS_TYPE_KEYS[0], FS_TYPE_KEYS[1]
            )));
        }
    }
    if let Some(a) = modify(mutable)? {
        out.allocation = Some(a);
    }
    Ok(out)
}

/// Parses mutable parameters (ControllerModifyVolume): only `allocation` (thin|thick). Every key
/// is checked before anything is applied.
pub fn modify(mutable: &HashMap<String, String>) -> Result<Option<Allocation>, Status> {
    check_size("mutable parameters", mutable)?;
    let mut allocation = None;
    for (k, v) in mutable {
        if k == ALLOCATION_KEY {
            allocation = Some(parse_allocation(v)?);
        } else {
            return Err(invalid(format!(
                "unsupported mutable parameter {k:?} (loopvol can change {ALLOCATION_KEY})"
            )));
        }
    }
    Ok(allocation)
}

/// Checks CreateSnapshot / CreateVolumeGroupSnapshot parameters: loopvol takes none.
pub fn snapshot(params: &HashMap<String, String>) -> Result<(), Status> {
    check_size("parameters", params)?;
    match params.keys().find(|k| !is_metadata(k, &SNAPSHOT_METADATA)) {
        Some(k) => Err(invalid(format!(
            "unknown snapshot parameter {k:?} (loopvol takes none)"
        ))),
        None => Ok(()),
    }
}

/// The smallest volume `fs` can be formatted on (mkfs refuses less).
pub fn min_size(fs: Option<FsType>) -> u64 {
    match fs {
        Some(FsType::Xfs) => 300 << 20,
        Some(FsType::Btrfs) => 128 << 20,
        Some(FsType::Ext4) | None => BLOCK,
    }
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|n| n / BLOCK * BLOCK)
}

/// A capacity range in bytes, `0` meaning unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub required: u64,
    pub limit: u64,
}

impl Range {
    pub fn parse(range: Option<&loopvol_proto::csi::v1::CapacityRange>) -> Result<Range, Status> {
        let Some(r) = range else {
            return Ok(Range::default());
        };
        if r.required_bytes < 0 || r.limit_bytes < 0 {
            return Err(invalid("capacity range bytes must not be negative"));
        }
        let out = Range {
            required: r.required_bytes as u64,
            limit: r.limit_bytes as u64,
        };
        if out.limit != 0 && out.limit < out.required {
            return Err(Status::out_of_range(format!(
                "limit_bytes {} is smaller than required_bytes {}",
                out.limit, out.required
            )));
        }
        Ok(out)
    }

    /// Whether a volume of `size` bytes satisfies this range.
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }

    /// The size to create: `required` (or `default` when unset), at least `min`, in whole
    /// blocks, within the limit. OUT_OF_RANGE when no such size exists.
    pub fn choose(&self, default: u64, min: u64) -> Result<u64, Status> {
        let mut want = if self.required > 0 {
            self.required
        } else if self.limit > 0 {
            default.min(self.limit)
        } else {
            default
        };
        want = want.max(min);
        let too_big = || Status::out_of_range(format!("{} bytes is too large", self.required));
        let mut size = round_up(want).ok_or_else(too_big)?;
        if size > i64::MAX as u64 {
            return Err(too_big());
        }
        if self.limit > 0 && size > self.limit {
            size = self.limit / BLOCK * BLOCK;
        }
        if size == 0 || size < self.required || size < min {
            return Err(Status::out_of_range(format!(
                "no volume size fits required_bytes {} and limit_bytes {} (volumes come in \
                 whole {BLOCK}-byte blocks, and this filesystem needs at least {min} bytes)",
                self.required, self.limit
            )));
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn volume_parameters() {
        let p = volume(
            &map(&[
                ("csi.storage.k8s.io/fstype", "xfs"),
                ("allocation", "thick"),
                ("csi.storage.k8s.io/pvc/name", "data"),
                ("csi.storage.k8s.io/pv/name", "pvc-1"),
            ]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(p.fs_type, Some(FsType::Xfs));
        assert_eq!(p.allocation, Some(Allocation::Thick));
        assert!(volume(&map(&[("fsType", "ntfs")]), &HashMap::new()).is_err());
        assert!(volume(&map(&[("speed", "fast")]), &HashMap::new()).is_err());
        assert!(volume(&map(&[("csi.storage.k8s.io/other", "x")]), &HashMap::new()).is_err());
        assert!(volume(
            &map(&[("fsType", "xfs"), ("csi.storage.k8s.io/fstype", "ext4")]),
            &HashMap::new()
        )
        .is_err());
        let p = volume(
            &map(&[("allocation", "thin")]),
            &map(&[("allocation", "thick")]),
        )
        .unwrap();
        assert_eq!(p.allocation, Some(Allocation::Thick));
        let big = "x".repeat(5000);
        assert!(volume(
            &map(&[("csi.storage.k8s.io/pv/name", &big)]),
            &HashMap::new()
        )
        .is_err());
    }

    #[test]
    fn mutable_and_snapshot_parameters() {
        assert_eq!(modify(&HashMap::new()).unwrap(), None);
        assert_eq!(
            modify(&map(&[("allocation", "thick")])).unwrap(),
            Some(Allocation::Thick)
        );
        assert!(modify(&map(&[("allocation", "thick"), ("iops", "5")])).is_err());
        assert!(modify(&map(&[("allocation", "fat")])).is_err());
        snapshot(&map(&[("csi.storage.k8s.io/volumesnapshot/name", "s")])).unwrap();
        assert!(snapshot(&map(&[("x", "y")])).is_err());
    }

    #[test]
    fn sizes() {
        let r = |required, limit| Range { required, limit };
        assert_eq!(r(0, 0).choose(DEFAULT_SIZE, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(r(0, 1 << 20).choose(DEFAULT_SIZE, 0).unwrap(), 1 << 20);
        assert_eq!(r(1, 0).choose(DEFAULT_SIZE, 0).unwrap(), 4096);
        assert_eq!(r(1, 4096).choose(DEFAULT_SIZE, 0).unwrap(), 4096);
        assert_eq!(r(5000, 9000).choose(DEFAULT_SIZE, 0).unwrap(), 8192);
        assert!(r(5000, 6000).choose(DEFAULT_SIZE, 0).is_err());
        assert_eq!(
            r(1 << 20, 0).choose(DEFAULT_SIZE, 300 << 20).unwrap(),
            300 << 20
        );
        assert!(r(1 << 20, 2 << 20).choose(DEFAULT_SIZE, 300 << 20).is_err());
        assert!(r(u64::MAX, 0).choose(DEFAULT_SIZE, 0).is_err());
        let pb = loopvol_proto::csi::v1::CapacityRange {
            required_bytes: 10,
            limit_bytes: 5,
        };
        assert_eq!(
            Range::parse(Some(&pb)).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert!(r(10, 20).admits(15) && !r(10, 20).admits(21) && r(10, 0).admits(1 << 40));
    }
}
