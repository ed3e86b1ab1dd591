//! CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot.

use loopvol::{ErrorKind, SnapshotId, SnapshotMeta, SnapshotRequest, VolumeId};
use loopvol_proto::csi::v1 as pb;
use tonic::Status;

use crate::convert;
use crate::error::{invalid, require, OrStatus};
use crate::inflight;
use crate::params;
use crate::rpc::Rpc;

use super::Controller;

fn entries(snaps: &[SnapshotMeta]) -> Vec<pb::list_snapshots_response::Entry> {
    snaps
        .iter()
        .map(|s| pb::list_snapshots_response::Entry {
            snapshot: Some(convert::snapshot(s)),
        })
        .collect()
}

impl Controller {
    pub(super) async fn create_snapshot(
        &self,
        r: pb::CreateSnapshotRequest,
    ) -> Result<pb::CreateSnapshotResponse, Status> {
        const RPC: Rpc = Rpc::CreateSnapshot;
        require("name", &r.name)?;
        require("source_volume_id", &r.source_volume_id)?;
        let id = SnapshotId::for_name(&r.name).or_status(RPC)?;
        params::snapshot(&r.parameters)?;
        let request = SnapshotRequest {
            name: r.name,
            source: VolumeId::parse("source volume ID", r.source_volume_id).or_status(RPC)?,
        };
        let snap = self
            .driver
            .run(RPC, vec![inflight::snapshot(&id)], move |pool| {
                Ok(pool.create_snapshot(&request)?)
            })
            .await?;
        Ok(pb::CreateSnapshotResponse {
            snapshot: Some(convert::snapshot(&snap)),
        })
    }

    pub(super) async fn delete_snapshot(
        &self,
        r: pb::DeleteSnapshotRequest,
    ) -> Result<pb::DeleteSnapshotResponse, Status> {
        const RPC: Rpc = Rpc::DeleteSnapshot;
        require("snapshot_id", &r.snapshot_id)?;
        let id = SnapshotId::try_from(r.snapshot_id).or_status(RPC)?;
        self.driver
            .run(RPC, vec![inflight::snapshot(&id)], move |pool| {
                Ok(pool.delete_snapshot(&id)?)
            })
            .await?;
        Ok(pb::DeleteSnapshotResponse {})
    }

    pub(super) async fn list_snapshots(
        &self,
        r: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, Status> {
        const RPC: Rpc = Rpc::ListSnapshots;
        let max = usize::try_from(r.max_entries)
            .map_err(|_| invalid("max_entries must not be negative"))?;
        // A source that cannot be a volume ID has no snapshots.
        let source = match r.source_volume_id.as_str() {
            "" => None,
            s => match VolumeId::try_from(s) {
                Ok(id) => Some(id),
                Err(_) => return Ok(pb::ListSnapshotsResponse::default()),
            },
        };
        if !r.snapshot_id.is_empty() {
            // One snapshot by ID: present (and from the named source, if any) or an empty list.
            // An ID that cannot exist (malformed) is simply not there.
            let Ok(id) = SnapshotId::try_from(r.snapshot_id) else {
                return Ok(pb::ListSnapshotsResponse::default());
            };
            let found = self
                .driver
                .run(RPC, Vec::new(), move |pool| match pool.get_snapshot(&id) {
                    Ok(s) if source.as_ref().is_none_or(|v| s.source_volume_id == *v) => {
                        Ok(vec![s])
                    }
                    Ok(_) => Ok(Vec::new()),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(e.into()),
                })
                .await?;
            return Ok(pb::ListSnapshotsResponse {
                entries: entries(&found),
                next_token: String::new(),
            });
        }
        let token = Some(r.starting_token).filter(|t| !t.is_empty());
        let page = self
            .driver
            .run(RPC, Vec::new(), move |pool| {
                Ok(pool.list_snapshots(source.as_ref(), token.as_deref(), max)?)
            })
            .await?;
        Ok(pb::ListSnapshotsResponse {
            entries: entries(&page.entries),
            next_token: page.next_token.unwrap_or_default(),
        })
    }

    pub(super) async fn get_snapshot(
        &self,
        r: pb::GetSnapshotRequest,
    ) -> Result<pb::GetSnapshotResponse, Status> {
        const RPC: Rpc = Rpc::GetSnapshot;
        require("snapshot_id", &r.snapshot_id)?;
        let id = SnapshotId::try_from(r.snapshot_id).or_status(RPC)?;
        let snap = self
            .driver
            .run(RPC, Vec::new(), move |pool| Ok(pool.get_snapshot(&id)?))
            .await?;
        Ok(pb::GetSnapshotResponse {
            snapshot: Some(convert::snapshot(&snap)),
        })
    }
}
