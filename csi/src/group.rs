//! The GroupController service: snapshots of several volumes taken at one point in time (all
//! frozen together, then copied). The backend does the work, including the members check of
//! Get and Delete.

use std::sync::Arc;

use loopvol::{ErrorKind, GroupSnapshotId, SnapshotId, VolumeId};
use loopvol_proto::csi::v1 as pb;
use pb::group_controller_service_capability::rpc::Type as Cap;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::{invalid, require, OrStatus};
use crate::inflight;
use crate::log::serve;
use crate::params;
use crate::rpc::Rpc;
use crate::server::Driver;

pub struct GroupController {
    driver: Arc<Driver>,
}

/// The member IDs a request names (it may name none). A malformed one is refused, but only
/// once the group is known to exist: an unknown group is NOT_FOUND (or, to delete, done)
/// whatever else the request says.
fn expected_members(ids: Vec<String>) -> loopvol::Result<Vec<SnapshotId>> {
    ids.into_iter().map(SnapshotId::try_from).collect()
}

impl GroupController {
    pub fn new(driver: &Arc<Driver>) -> Self {
        GroupController {
            driver: Arc::clone(driver),
        }
    }

    async fn capabilities(
        &self,
        _r: pb::GroupControllerGetCapabilitiesRequest,
    ) -> Result<pb::GroupControllerGetCapabilitiesResponse, Status> {
        Ok(pb::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![pb::GroupControllerServiceCapability {
                r#type: Some(pb::group_controller_service_capability::Type::Rpc(
                    pb::group_controller_service_capability::Rpc {
                        r#type: Cap::CreateDeleteGetVolumeGroupSnapshot as i32,
                    },
                )),
            }],
        })
    }

    async fn create(
        &self,
        r: pb::CreateVolumeGroupSnapshotRequest,
    ) -> Result<pb::CreateVolumeGroupSnapshotResponse, Status> {
        const RPC: Rpc = Rpc::CreateVolumeGroupSnapshot;
        require("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(invalid("source_volume_ids is required"));
        }
        let group_id = GroupSnapshotId::for_name(&r.name).or_status(RPC)?;
        params::snapshot(&r.parameters)?;
        let sources = r
            .source_volume_ids
            .into_iter()
            .map(|v| VolumeId::parse("source volume ID", v).or_status(RPC))
            .collect::<Result<Vec<_>, _>>()?;
        let name = r.name;
        let group = self
            .driver
            .run(RPC, vec![inflight::group(&group_id)], move |pool| {
                Ok(pool.create_group_snapshot(&name, &sources)?)
            })
            .await?;
        Ok(pb::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(convert::group_snapshot(&group)),
        })
    }

    async fn delete(
        &self,
        r: pb::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<pb::DeleteVolumeGroupSnapshotResponse, Status> {
        const RPC: Rpc = Rpc::DeleteVolumeGroupSnapshot;
        require("group_snapshot_id", &r.group_snapshot_id)?;
        let id = GroupSnapshotId::try_from(r.group_snapshot_id).or_status(RPC)?;
        let expected = expected_members(r.snapshot_ids);
        self.driver
            .run(
                RPC,
                vec![inflight::group(&id)],
                move |pool| match expected {
                    Ok(expected) => Ok(pool.delete_group_snapshot(&id, &expected)?),
                    Err(bad) => match pool.get_group_snapshot(&id, &[]) {
                        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(e.into()),
                        Ok(_) => Err(bad.into()),
                    },
                },
            )
            .await?;
        Ok(pb::DeleteVolumeGroupSnapshotResponse {})
    }

    async fn get(
        &self,
        r: pb::GetVolumeGroupSnapshotRequest,
    ) -> Result<pb::GetVolumeGroupSnapshotResponse, Status> {
        const RPC: Rpc = Rpc::GetVolumeGroupSnapshot;
        require("group_snapshot_id", &r.group_snapshot_id)?;
        let id = GroupSnapshotId::try_from(r.group_snapshot_id).or_status(RPC)?;
        let expected = expected_members(r.snapshot_ids);
        let group = self
            .driver
            .run(RPC, Vec::new(), move |pool| {
                let group = pool.get_group_snapshot(&id, expected.as_deref().unwrap_or(&[]))?;
                expected?;
                Ok(group)
            })
            .await?;
        Ok(pb::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(convert::group_snapshot(&group)),
        })
    }
}

#[tonic::async_trait]
impl pb::group_controller_server::GroupController for GroupController {
    async fn group_controller_get_capabilities(
        &self,
        req: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        serve(Rpc::GroupControllerGetCapabilities, req, |r| {
            self.capabilities(r)
        })
        .await
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        serve(Rpc::CreateVolumeGroupSnapshot, req, |r| self.create(r)).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        serve(Rpc::DeleteVolumeGroupSnapshot, req, |r| self.delete(r)).await
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        serve(Rpc::GetVolumeGroupSnapshot, req, |r| self.get(r)).await
    }
}
