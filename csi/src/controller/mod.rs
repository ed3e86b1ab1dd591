//! The Controller service: volumes and snapshots as the pool holds them (create, delete, list,
//! capacity, expand, modify) and, on a shared pool, which node may use a volume (publish).
//!
//! - this file: the service, its trait (one line per RPC), and what the handlers share;
//! - `volumes`: create, delete, validate, list, get, expand, modify;
//! - `snapshots`: create, delete, list, get;
//! - `publish`: ControllerPublish/Unpublish (claims on a shared pool);
//! - `capacity`: GetCapacity and the capabilities.

mod capacity;
mod publish;
mod snapshots;
mod volumes;

use std::collections::HashMap;
use std::sync::Arc;

use loopvol::VolumeMeta;
use loopvol_proto::csi::v1 as pb;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::log::serve;
use crate::rpc::Rpc;
use crate::server::Driver;

pub struct Controller {
    driver: Arc<Driver>,
}

impl Controller {
    pub fn new(driver: &Arc<Driver>) -> Self {
        Controller {
            driver: Arc::clone(driver),
        }
    }

    fn volume_pb(&self, m: &VolumeMeta) -> pb::Volume {
        pb::Volume {
            capacity_bytes: convert::clamp(m.size_bytes),
            volume_id: m.id.to_string(),
            volume_context: HashMap::new(),
            content_source: m.source.as_ref().map(convert::source),
            accessible_topology: self.driver.volume_topology(m.node.as_ref()),
        }
    }

    /// The nodes a volume is published to: its controller claims on a shared pool; on a
    /// node-local pool (no ControllerPublish) the nodes that have it staged.
    fn published_nodes(&self, m: &VolumeMeta) -> Vec<String> {
        let holds = if self.driver.config.shared {
            &m.claims
        } else {
            &m.staged
        };
        holds.iter().map(|h| h.node.to_string()).collect()
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        serve(Rpc::CreateVolume, req, |r| self.create_volume(r)).await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        serve(Rpc::DeleteVolume, req, |r| self.delete_volume(r)).await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        serve(Rpc::ControllerPublishVolume, req, |r| self.publish(r)).await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        serve(Rpc::ControllerUnpublishVolume, req, |r| self.unpublish(r)).await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        serve(Rpc::ValidateVolumeCapabilities, req, |r| {
            self.validate_capabilities(r)
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        serve(Rpc::ListVolumes, req, |r| self.list_volumes(r)).await
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        serve(Rpc::GetCapacity, req, |r| self.get_capacity(r)).await
    }

    async fn controller_get_capabilities(
        &self,
        req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        serve(Rpc::ControllerGetCapabilities, req, |r| {
            self.capabilities(r)
        })
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        serve(Rpc::CreateSnapshot, req, |r| self.create_snapshot(r)).await
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        serve(Rpc::DeleteSnapshot, req, |r| self.delete_snapshot(r)).await
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        serve(Rpc::ListSnapshots, req, |r| self.list_snapshots(r)).await
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        serve(Rpc::GetSnapshot, req, |r| self.get_snapshot(r)).await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        serve(Rpc::ControllerExpandVolume, req, |r| self.expand(r)).await
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        serve(Rpc::ControllerGetVolume, req, |r| self.get_volume(r)).await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        serve(Rpc::ControllerModifyVolume, req, |r| self.modify(r)).await
    }
}
