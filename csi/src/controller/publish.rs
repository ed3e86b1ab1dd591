//! ControllerPublishVolume and ControllerUnpublishVolume: claims that keep a read-write volume of
//! a shared pool on one node at a time.

use std::collections::HashMap;

use loopvol::{AccessMode, NodeName, VolumeId};
use loopvol_proto::csi::v1 as pb;
use tonic::Status;

use crate::caps;
use crate::error::{invalid, require, OrStatus};
use crate::inflight;
use crate::rpc::Rpc;

use super::Controller;

impl Controller {
    fn require_shared(&self, rpc: Rpc) -> Result<(), Status> {
        if self.driver.config.shared {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "{rpc} is only served for a pool shared between nodes (--shared-pool); \
                 volumes of a node-local pool need no attach step"
            )))
        }
    }

    pub(super) async fn publish(
        &self,
        r: pb::ControllerPublishVolumeRequest,
    ) -> Result<pb::ControllerPublishVolumeResponse, Status> {
        const RPC: Rpc = Rpc::ControllerPublishVolume;
        self.require_shared(RPC)?;
        require("volume_id", &r.volume_id)?;
        require("node_id", &r.node_id)?;
        let cap = caps::parse(
            r.volume_capability
                .as_ref()
                .ok_or_else(|| invalid("volume_capability is required"))?,
            true,
        )
        .map_err(|e| invalid(e.message()))?;
        let node = NodeName::parse("node ID", r.node_id).or_status(RPC)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let mode = if r.readonly {
            AccessMode::ReadOnly
        } else {
            cap.mode
        };
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                // The volume first: an unknown volume is NOT_FOUND whatever the node.
                let mut volume = pool.volume(&id)?;
                pool.check_node_registered(&node)?;
                Ok(volume.claim(&node, mode, None)?)
            })
            .await?;
        Ok(pb::ControllerPublishVolumeResponse {
            publish_context: HashMap::new(),
        })
    }

    pub(super) async fn unpublish(
        &self,
        r: pb::ControllerUnpublishVolumeRequest,
    ) -> Result<pb::ControllerUnpublishVolumeResponse, Status> {
        const RPC: Rpc = Rpc::ControllerUnpublishVolume;
        self.require_shared(RPC)?;
        require("volume_id", &r.volume_id)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        // No node: unpublish from every node.
        let node = match r.node_id.as_str() {
            "" => None,
            n => Some(NodeName::parse("node ID", n).or_status(RPC)?),
        };
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                // Unknown volume: nothing is published.
                let Some(mut volume) = pool.find_volume(&id)? else {
                    return Ok(());
                };
                match &node {
                    Some(node) => volume.release(node)?,
                    None => volume.release_all()?,
                }
                Ok(())
            })
            .await?;
        Ok(pb::ControllerUnpublishVolumeResponse {})
    }
}
