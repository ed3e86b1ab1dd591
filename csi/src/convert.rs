//! Backend records as CSI messages.

use loopvol::{SnapshotMeta, VolumeSource};
use loopvol_proto::csi::v1 as pb;
use pb::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource as PbVolumeSource,
};

/// A backend metadata timestamp as a protobuf one.
pub fn timestamp(unix: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// A byte or inode count as CSI's int64 (saturating: sizes never come near it).
pub fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A snapshot as CSI describes it.
pub fn snapshot(s: &SnapshotMeta) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: clamp(s.size_bytes),
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume_id.to_string(),
        creation_time: Some(timestamp(s.created_unix)),
        // Copies are complete before the metadata is committed.
        ready_to_use: true,
        group_snapshot_id: s
            .group_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// A group snapshot as CSI describes it (created when its first member was).
pub fn group_snapshot(g: &loopvol::GroupSnapshot) -> pb::VolumeGroupSnapshot {
    let created = g.members.iter().map(|s| s.created_unix).min().unwrap_or(0);
    pb::VolumeGroupSnapshot {
        group_snapshot_id: g.id.to_string(),
        snapshots: g.members.iter().map(snapshot).collect(),
        creation_time: Some(timestamp(created)),
        ready_to_use: true,
    }
}

pub fn source(s: &VolumeSource) -> pb::VolumeContentSource {
    pb::VolumeContentSource {
        r#type: Some(match s {
            VolumeSource::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            VolumeSource::Volume(id) => SourceType::Volume(PbVolumeSource {
                volume_id: id.to_string(),
            }),
        }),
    }
}

/// A backend volume condition as CSI reports it.
pub fn condition(c: loopvol::Condition) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: c.abnormal,
        message: c.message,
    }
}
