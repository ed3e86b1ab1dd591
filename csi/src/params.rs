//! Request parameters (StorageClass `parameters`, VolumeAttributesClass `mutable_parameters`,
//! VolumeSnapshotClass `parameters`) and capacity ranges, as wire fields. Unknown keys are
//! refused, except the metadata keys Kubernetes sidecars add with `--extra-create-metadata`.
//! What a range resolves to is the backend's decision (`loopvol::SizeRequest`).

use std::collections::HashMap;

use loopvol::{Allocation, FsType, SizeRequest};
use loopvol_proto::csi::v1::CapacityRange;
use tonic::Status;

use crate::error::{invalid, to_status};
use crate::rpc::Rpc;

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

/// A capacity range as the backend's size request (`0`: unset). Negative bytes are
/// `INVALID_ARGUMENT`; a limit below the requirement is `OUT_OF_RANGE`.
pub fn range(rpc: Rpc, range: Option<&CapacityRange>) -> Result<SizeRequest, Status> {
    let Some(r) = range else {
        return Ok(SizeRequest::default());
    };
    let (Ok(required), Ok(limit)) = (
        u64::try_from(r.required_bytes),
        u64::try_from(r.limit_bytes),
    ) else {
        return Err(invalid("capacity range bytes must not be negative"));
    };
    SizeRequest::new(required, limit).map_err(|e| to_status(rpc, e))
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
    fn ranges() {
        let pb = |required_bytes, limit_bytes| CapacityRange {
            required_bytes,
            limit_bytes,
        };
        // (required, limit) → Ok(request) or the code
        type Row = (i64, i64, Result<(u64, u64), tonic::Code>);
        let table: &[Row] = &[
            (0, 0, Ok((0, 0))),
            (10, 0, Ok((10, 0))),
            (10, 20, Ok((10, 20))),
            (10, 10, Ok((10, 10))),
            (10, 5, Err(tonic::Code::OutOfRange)),
            (-1, 0, Err(tonic::Code::InvalidArgument)),
            (0, -1, Err(tonic::Code::InvalidArgument)),
        ];
        for &(required, limit, want) in table {
            let got = range(Rpc::CreateVolume, Some(&pb(required, limit)))
                .map(|r| (r.required, r.limit))
                .map_err(|s| s.code());
            assert_eq!(got, want, "({required}, {limit})");
        }
        assert_eq!(
            range(Rpc::CreateVolume, None).unwrap(),
            SizeRequest::default()
        );
    }
}
