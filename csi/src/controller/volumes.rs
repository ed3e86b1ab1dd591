//! CreateVolume, DeleteVolume, ValidateVolumeCapabilities, ListVolumes, ControllerGetVolume,
//! ControllerExpandVolume, ControllerModifyVolume.

use loopvol::{CreateVolume, SnapshotId, VolumeId, VolumeSource};
use loopvol_proto::csi::v1 as pb;
use pb::volume_content_source::Type as SourceType;
use tonic::Status;

use crate::caps::{self, CapError};
use crate::convert;
use crate::error::{invalid, require, OrStatus};
use crate::inflight;
use crate::params;
use crate::rpc::Rpc;

use super::Controller;

impl Controller {
    pub(super) async fn create_volume(
        &self,
        r: pb::CreateVolumeRequest,
    ) -> Result<pb::CreateVolumeResponse, Status> {
        const RPC: Rpc = Rpc::CreateVolume;
        require("name", &r.name)?;
        let id = VolumeId::for_name(&r.name).or_status(RPC)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let mut cap_fs = None;
        for c in &r.volume_capabilities {
            let cap =
                caps::parse(c, self.driver.config.shared).map_err(|e| invalid(e.message()))?;
            if let Some(fs) = cap.fs_type() {
                if cap_fs.is_some_and(|have| have != fs) {
                    return Err(invalid(
                        "the volume capabilities ask for different filesystems",
                    ));
                }
                cap_fs = Some(fs);
            }
        }
        let params = params::volume(&r.parameters, &r.mutable_parameters)?;
        let fs_type = match (params.fs_type, cap_fs) {
            (Some(p), Some(c)) if p != c => {
                return Err(invalid(format!(
                    "parameter fsType {p} and capability fs_type {c} disagree"
                )))
            }
            (p, c) => p.or(c),
        };
        let source = match r.volume_content_source.as_ref().map(|s| &s.r#type) {
            None => None,
            Some(Some(SourceType::Snapshot(s))) => {
                require("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                let id = SnapshotId::parse("source snapshot ID", s.snapshot_id.as_str());
                Some(VolumeSource::Snapshot(id.or_status(RPC)?))
            }
            Some(Some(SourceType::Volume(v))) => {
                require("volume_content_source.volume.volume_id", &v.volume_id)?;
                let id = VolumeId::parse("source volume ID", v.volume_id.as_str());
                Some(VolumeSource::Volume(id.or_status(RPC)?))
            }
            Some(None) => return Err(invalid("volume_content_source names no snapshot or volume")),
        };
        if let Some(req) = &r.accessibility_requirements {
            if !req.requisite.is_empty()
                && !req.requisite.iter().any(|t| self.driver.in_topology(t))
            {
                return Err(Status::resource_exhausted(format!(
                    "this pool is on node {} ({}), which none of the requisite topologies includes",
                    self.driver.config.node_id,
                    crate::server::TOPOLOGY_KEY
                )));
            }
        }
        let request = CreateVolume {
            name: r.name,
            size: params::range(RPC, r.capacity_range.as_ref())?,
            fs_type,
            allocation: params.allocation,
            source,
        };
        let meta = self
            .driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                Ok(pool.create_volume(&request)?)
            })
            .await?;
        Ok(pb::CreateVolumeResponse {
            volume: Some(self.volume_pb(&meta)),
        })
    }

    pub(super) async fn delete_volume(
        &self,
        r: pb::DeleteVolumeRequest,
    ) -> Result<pb::DeleteVolumeResponse, Status> {
        const RPC: Rpc = Rpc::DeleteVolume;
        require("volume_id", &r.volume_id)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                Ok(pool.delete_volume(&id)?)
            })
            .await?;
        Ok(pb::DeleteVolumeResponse {})
    }

    pub(super) async fn validate_capabilities(
        &self,
        r: pb::ValidateVolumeCapabilitiesRequest,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, Status> {
        const RPC: Rpc = Rpc::ValidateVolumeCapabilities;
        require("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let parsed: Vec<_> = r
            .volume_capabilities
            .iter()
            .map(|c| caps::parse(c, self.driver.config.shared))
            .collect();
        if let Some(Err(CapError::Malformed(m))) = parsed
            .iter()
            .find(|p| matches!(p, Err(CapError::Malformed(_))))
        {
            return Err(invalid(m.clone()));
        }
        let id = VolumeId::try_from(r.volume_id.as_str()).or_status(RPC)?;
        let meta = self
            .driver
            .run(RPC, Vec::new(), move |pool| Ok(pool.get_volume(&id)?))
            .await?;
        let mut problem = None;
        for p in &parsed {
            match p {
                Err(e) => problem = Some(e.message().to_owned()),
                Ok(cap) => {
                    if let (Some(want), Some(have)) = (cap.fs_type(), meta.fs_type) {
                        if want != have {
                            problem = Some(format!("the volume holds {have}, not {want}"));
                        }
                    }
                }
            }
        }
        if let Err(e) = params::volume(&r.parameters, &r.mutable_parameters) {
            problem = Some(e.message().to_owned());
        }
        Ok(match problem {
            Some(message) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
        })
    }

    pub(super) async fn list_volumes(
        &self,
        r: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, Status> {
        let max = usize::try_from(r.max_entries)
            .map_err(|_| invalid("max_entries must not be negative"))?;
        let token = Some(r.starting_token).filter(|t| !t.is_empty());
        let page = self
            .driver
            .run(Rpc::ListVolumes, Vec::new(), move |pool| {
                // Every entry carries its condition (VOLUME_CONDITION is advertised). A volume
                // whose record cannot be read is listed, abnormal, naming the file: one bad entry
                // never fails the listing, and the health monitor reports it.
                Ok(pool.list_volumes_with_conditions(token.as_deref(), max)?)
            })
            .await?;
        Ok(pb::ListVolumesResponse {
            entries: page
                .entries
                .into_iter()
                .map(|entry| self.list_entry(entry))
                .collect(),
            next_token: page.next_token.unwrap_or_default(),
        })
    }

    fn list_entry(
        &self,
        entry: loopvol::Listed<loopvol::ListedVolume>,
    ) -> pb::list_volumes_response::Entry {
        match entry {
            Ok(v) => pb::list_volumes_response::Entry {
                volume: Some(self.volume_pb(&v.meta)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: self.published_nodes(&v.meta),
                    volume_condition: Some(convert::condition(v.condition)),
                }),
            },
            Err(bad) => pb::list_volumes_response::Entry {
                volume: Some(pb::Volume {
                    volume_id: bad.id,
                    ..Default::default()
                }),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(pb::VolumeCondition {
                        abnormal: true,
                        message: bad.reason,
                    }),
                }),
            },
        }
    }

    pub(super) async fn get_volume(
        &self,
        r: pb::ControllerGetVolumeRequest,
    ) -> Result<pb::ControllerGetVolumeResponse, Status> {
        const RPC: Rpc = Rpc::ControllerGetVolume;
        require("volume_id", &r.volume_id)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let (meta, condition) = self
            .driver
            .run(RPC, Vec::new(), move |pool| {
                let meta = pool.get_volume(&id)?;
                let condition = pool.volume_condition(&meta)?;
                Ok((meta, condition))
            })
            .await?;
        Ok(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume_pb(&meta)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: self.published_nodes(&meta),
                volume_condition: Some(convert::condition(condition)),
            }),
        })
    }

    pub(super) async fn expand(
        &self,
        r: pb::ControllerExpandVolumeRequest,
    ) -> Result<pb::ControllerExpandVolumeResponse, Status> {
        const RPC: Rpc = Rpc::ControllerExpandVolume;
        require("volume_id", &r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        let size = params::range(RPC, Some(range))?;
        if size.required == 0 {
            return Err(invalid("capacity_range.required_bytes is required"));
        }
        let block = match &r.volume_capability {
            Some(c) => Some(
                caps::parse(c, self.driver.config.shared)
                    .map_err(|e| invalid(e.message()))?
                    .is_block(),
            ),
            None => None,
        };
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let expanded = self
            .driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                Ok(pool.volume(&id)?.expand(size)?)
            })
            .await?;
        // A raw block volume is grown once the device is; a filesystem grows on its node. The
        // capability, when given, says which this volume is.
        let node_expansion_required = match block {
            Some(block) => !block,
            None => expanded.node_expansion_required,
        };
        Ok(pb::ControllerExpandVolumeResponse {
            capacity_bytes: convert::clamp(expanded.size_bytes),
            node_expansion_required,
        })
    }

    pub(super) async fn modify(
        &self,
        r: pb::ControllerModifyVolumeRequest,
    ) -> Result<pb::ControllerModifyVolumeResponse, Status> {
        const RPC: Rpc = Rpc::ControllerModifyVolume;
        require("volume_id", &r.volume_id)?;
        // Every parameter is checked before anything is applied.
        let allocation = params::modify(&r.mutable_parameters)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                let mut volume = pool.volume(&id)?;
                if let Some(a) = allocation {
                    volume.set_allocation(a)?;
                }
                Ok(())
            })
            .await?;
        Ok(pb::ControllerModifyVolumeResponse {})
    }
}
