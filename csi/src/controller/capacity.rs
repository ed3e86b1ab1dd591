//! GetCapacity and ControllerGetCapabilities.

use std::collections::HashMap;

use loopvol_proto::csi::v1 as pb;
use pb::controller_service_capability::rpc::Type as Cap;
use tonic::Status;

use crate::caps::{self, CapError};
use crate::convert;
use crate::error::invalid;
use crate::params;
use crate::rpc::Rpc;

use super::Controller;

impl Controller {
    pub(super) async fn get_capacity(
        &self,
        r: pb::GetCapacityRequest,
    ) -> Result<pb::GetCapacityResponse, Status> {
        let none = pb::GetCapacityResponse {
            available_capacity: 0,
            maximum_volume_size: Some(0),
            minimum_volume_size: None,
        };
        for c in &r.volume_capabilities {
            match caps::parse(c, self.driver.config.shared) {
                Ok(_) => {}
                Err(CapError::Malformed(m)) => return Err(invalid(m)),
                Err(CapError::Unsupported(_)) => return Ok(none),
            }
        }
        let params = params::volume(&r.parameters, &HashMap::new())?;
        if let Some(t) = &r.accessible_topology {
            if !self.driver.in_topology(t) {
                return Ok(none);
            }
        }
        let cap = self
            .driver
            .run(Rpc::GetCapacity, Vec::new(), |pool| Ok(pool.capacity()?))
            .await?;
        // What admission would let a volume of these parameters take: the same numbers.
        let bytes = cap.available(params.allocation.unwrap_or_default());
        let available = convert::clamp(bytes);
        let min = loopvol::min_size(params.fs_type);
        Ok(pb::GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(if bytes < min { 0 } else { available }),
            minimum_volume_size: None,
        })
    }

    pub(super) async fn capabilities(
        &self,
        _r: pb::ControllerGetCapabilitiesRequest,
    ) -> Result<pb::ControllerGetCapabilitiesResponse, Status> {
        let mut rpcs = vec![
            Cap::CreateDeleteVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::CreateDeleteSnapshot,
            Cap::ListSnapshots,
            Cap::CloneVolume,
            Cap::ListVolumesPublishedNodes,
            Cap::VolumeCondition,
            Cap::GetVolume,
            Cap::SingleNodeMultiWriter,
            Cap::GetSnapshot,
        ];
        if self.driver.config.shared {
            rpcs.push(Cap::PublishUnpublishVolume);
            rpcs.push(Cap::PublishReadonly);
            // On a node-local pool the controller that external-resizer talks to (one leader for
            // the cluster) is usually not on the node whose pool holds the image, so expansion is
            // left to NodeExpandVolume on that node (the resizer then only records the new size),
            // and modification (also the resizer's) is not offered: it would reach the wrong node.
            // The RPC itself still works wherever the volume is.
            rpcs.push(Cap::ExpandVolume);
            rpcs.push(Cap::ModifyVolume);
        }
        Ok(pb::ControllerGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| pb::ControllerServiceCapability {
                    r#type: Some(pb::controller_service_capability::Type::Rpc(
                        pb::controller_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect(),
        })
    }
}
