//! The Controller service: volumes and snapshots as the pool holds them (create, delete, list,
//! capacity, expand, modify) and, on a shared pool, which node may use a volume (publish).

use std::collections::HashMap;
use std::sync::Arc;

use loopvol::{
    validate, AccessMode, CreateVolume, ErrorKind, SnapshotMeta, VolumeMeta, VolumeSource,
};
use loopvol_proto::csi::v1 as pb;
use pb::controller_service_capability::rpc::Type as Rpc;
use pb::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource as PbVolumeSource,
};
use tonic::{Request, Response, Status};

use crate::caps::{self, CapError};
use crate::error::{invalid, require, to_status, Fail};
use crate::inflight;
use crate::log::{self, Redact};
use crate::params::{self, Range, DEFAULT_SIZE};
use crate::server::Driver;

pub struct Controller {
    driver: Arc<Driver>,
}

/// A backend metadata timestamp as a protobuf one.
fn timestamp(unix: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

fn clamp(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A snapshot as CSI describes it.
pub fn snapshot_pb(s: &SnapshotMeta) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: clamp(s.size_bytes),
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(timestamp(s.created_unix)),
        // Copies are complete before the metadata is committed.
        ready_to_use: true,
        group_snapshot_id: s.group_id.clone().unwrap_or_default(),
    }
}

fn source_pb(s: &VolumeSource) -> pb::VolumeContentSource {
    pb::VolumeContentSource {
        r#type: Some(match s {
            VolumeSource::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            VolumeSource::Volume(id) => SourceType::Volume(PbVolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

/// A backend volume condition as CSI reports it.
pub fn condition_pb(c: loopvol::Condition) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: c.abnormal,
        message: c.message,
    }
}

fn is_not_found(e: &loopvol::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

impl Controller {
    pub fn new(driver: &Arc<Driver>) -> Self {
        Controller {
            driver: Arc::clone(driver),
        }
    }

    fn volume_pb(&self, m: &VolumeMeta) -> pb::Volume {
        pb::Volume {
            capacity_bytes: clamp(m.size_bytes),
            volume_id: m.id.clone(),
            volume_context: HashMap::new(),
            content_source: m.source.as_ref().map(source_pb),
            accessible_topology: self.driver.volume_topology(m.node.as_deref()),
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
        holds.iter().map(|h| h.node.clone()).collect()
    }

    fn require_shared(&self, method: &str) -> Result<(), Status> {
        if self.driver.config.shared {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "{method} is only served for a pool shared between nodes (--shared-pool); \
                 volumes of a node-local pool need no attach step"
            )))
        }
    }

    async fn create_volume(
        &self,
        r: pb::CreateVolumeRequest,
    ) -> Result<pb::CreateVolumeResponse, Status> {
        const M: &str = "CreateVolume";
        require("name", &r.name)?;
        validate::check_name("volume name", &r.name).map_err(|e| to_status(M, e))?;
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
                Some(VolumeSource::Snapshot(s.snapshot_id.clone()))
            }
            Some(Some(SourceType::Volume(v))) => {
                require("volume_content_source.volume.volume_id", &v.volume_id)?;
                Some(VolumeSource::Volume(v.volume_id.clone()))
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
        let range = Range::parse(r.capacity_range.as_ref())?;
        let min = params::min_size(fs_type);
        let name = r.name;
        let id = validate::id_for_name(&name);
        let meta = self
            .driver
            .run(M, vec![inflight::volume(&id)], move |pool| {
                let existing = match pool.get_volume(&id) {
                    Ok(m) => Some(m),
                    Err(e) if is_not_found(&e) => None,
                    Err(e) => return Err(e.into()),
                };
                let size = match &existing {
                    // A repeat whose range the existing volume satisfies gets that volume.
                    Some(m) if m.name == name && range.admits(m.size_bytes) => m.size_bytes,
                    _ => {
                        let default = match (&source, range.required) {
                            (Some(VolumeSource::Snapshot(s)), 0) => {
                                pool.get_snapshot(s)?.size_bytes
                            }
                            (Some(VolumeSource::Volume(v)), 0) => pool.get_volume(v)?.size_bytes,
                            _ => DEFAULT_SIZE,
                        };
                        range.choose(default, min)?
                    }
                };
                let allocation = params
                    .allocation
                    .or(existing.map(|m| m.allocation))
                    .unwrap_or_default();
                Ok(pool.create_volume(&CreateVolume {
                    name,
                    size_bytes: size,
                    fs_type,
                    allocation,
                    source,
                })?)
            })
            .await?;
        Ok(pb::CreateVolumeResponse {
            volume: Some(self.volume_pb(&meta)),
        })
    }

    async fn validate_capabilities(
        &self,
        r: pb::ValidateVolumeCapabilitiesRequest,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, Status> {
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
        let id = r.volume_id.clone();
        let meta = self
            .driver
            .run("ValidateVolumeCapabilities", Vec::new(), move |pool| {
                Ok(pool.get_volume(&id)?)
            })
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

    async fn get_capacity(
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
            .run("GetCapacity", Vec::new(), |pool| Ok(pool.capacity()?))
            .await?;
        let available = clamp(cap.available_bytes);
        let min = params::min_size(params.fs_type);
        Ok(pb::GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(if cap.available_bytes < min {
                0
            } else {
                available
            }),
            minimum_volume_size: None,
        })
    }

    fn capabilities(&self) -> Vec<pb::ControllerServiceCapability> {
        let mut rpcs = vec![
            Rpc::CreateDeleteVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::CreateDeleteSnapshot,
            Rpc::ListSnapshots,
            Rpc::CloneVolume,
            Rpc::ListVolumesPublishedNodes,
            Rpc::VolumeCondition,
            Rpc::GetVolume,
            Rpc::SingleNodeMultiWriter,
            Rpc::GetSnapshot,
        ];
        if self.driver.config.shared {
            rpcs.push(Rpc::PublishUnpublishVolume);
            rpcs.push(Rpc::PublishReadonly);
            // On a node-local pool the controller that external-resizer talks to (one leader for
            // the cluster) is usually not on the node whose pool holds the image, so expansion is
            // left to NodeExpandVolume on that node (the resizer then only records the new size),
            // and modification (also the resizer's) is not offered: it would reach the wrong node.
            // The RPC itself still works wherever the volume is.
            rpcs.push(Rpc::ExpandVolume);
            rpcs.push(Rpc::ModifyVolume);
        }
        rpcs.into_iter()
            .map(|t| pb::ControllerServiceCapability {
                r#type: Some(pb::controller_service_capability::Type::Rpc(
                    pb::controller_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect()
    }

    async fn list_snapshots(
        &self,
        r: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, Status> {
        if r.max_entries < 0 {
            return Err(invalid("max_entries must not be negative"));
        }
        let entries = |snaps: Vec<SnapshotMeta>| -> Vec<pb::list_snapshots_response::Entry> {
            snaps
                .iter()
                .map(|s| pb::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_pb(s)),
                })
                .collect()
        };
        if !r.snapshot_id.is_empty() {
            // One snapshot by ID: present (and from the named source, if any) or an empty list.
            let (id, source) = (r.snapshot_id, r.source_volume_id);
            let found = self
                .driver
                .run("ListSnapshots", Vec::new(), move |pool| {
                    match pool.get_snapshot(&id) {
                        Ok(s) if source.is_empty() || s.source_volume_id == source => Ok(vec![s]),
                        Ok(_) => Ok(Vec::new()),
                        // An ID that cannot exist (malformed) is simply not there.
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::NotFound | ErrorKind::InvalidArgument
                            ) =>
                        {
                            Ok(Vec::new())
                        }
                        Err(e) => Err(e.into()),
                    }
                })
                .await?;
            return Ok(pb::ListSnapshotsResponse {
                entries: entries(found),
                next_token: String::new(),
            });
        }
        let token = Some(r.starting_token).filter(|t| !t.is_empty());
        let source = Some(r.source_volume_id).filter(|s| !s.is_empty());
        let max = r.max_entries as usize;
        let page = self
            .driver
            .run("ListSnapshots", Vec::new(), move |pool| {
                Ok(pool.list_snapshots(source.as_deref(), token.as_deref(), max)?)
            })
            .await?;
        Ok(pb::ListSnapshotsResponse {
            entries: entries(page.entries),
            next_token: page.next_token.unwrap_or_default(),
        })
    }

    async fn expand(
        &self,
        r: pb::ControllerExpandVolumeRequest,
    ) -> Result<pb::ControllerExpandVolumeResponse, Status> {
        require("volume_id", &r.volume_id)?;
        let range = Range::parse(Some(
            r.capacity_range
                .as_ref()
                .ok_or_else(|| invalid("capacity_range is required"))?,
        ))?;
        if range.required == 0 {
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
        let size = range.choose(0, 0)?;
        let id = r.volume_id;
        let (size, node_expansion_required) = self
            .driver
            .run("ControllerExpandVolume", vec![inflight::volume(&id)], move |pool| {
                let m = pool.get_volume(&id)?;
                if range.limit > 0 && m.size_bytes > range.limit {
                    return Err(Status::out_of_range(format!(
                        "volume {id} already has {} bytes, more than limit_bytes {}; volumes do not shrink",
                        m.size_bytes, range.limit
                    ))
                    .into());
                }
                let expanded = pool.expand_volume(&id, size)?;
                // A raw block volume is grown once the device is; a filesystem grows on its node.
                let node = match block {
                    Some(block) => !block,
                    None => m.fs_type.is_some(),
                };
                Ok((expanded.size_bytes, node && expanded.node_expansion_required))
            })
            .await?;
        Ok(pb::ControllerExpandVolumeResponse {
            capacity_bytes: clamp(size),
            node_expansion_required,
        })
    }

    async fn publish(
        &self,
        r: pb::ControllerPublishVolumeRequest,
    ) -> Result<pb::ControllerPublishVolumeResponse, Status> {
        const M: &str = "ControllerPublishVolume";
        self.require_shared(M)?;
        require("volume_id", &r.volume_id)?;
        require("node_id", &r.node_id)?;
        let cap = caps::parse(
            r.volume_capability
                .as_ref()
                .ok_or_else(|| invalid("volume_capability is required"))?,
            true,
        )
        .map_err(|e| invalid(e.message()))?;
        validate::check_node("node ID", &r.node_id).map_err(|e| to_status(M, e))?;
        let mode = if r.readonly {
            AccessMode::ReadOnly
        } else {
            cap.mode
        };
        let (id, node) = (r.volume_id, r.node_id);
        self.driver
            .run(M, vec![inflight::volume(&id)], move |pool| {
                // The volume first: an unknown volume is NOT_FOUND whatever the node.
                pool.get_volume(&id)?;
                pool.check_node_registered(&node)?;
                Ok(pool.claim(&id, &node, mode, None)?)
            })
            .await?;
        Ok(pb::ControllerPublishVolumeResponse {
            publish_context: HashMap::new(),
        })
    }

    async fn unpublish(
        &self,
        r: pb::ControllerUnpublishVolumeRequest,
    ) -> Result<pb::ControllerUnpublishVolumeResponse, Status> {
        const M: &str = "ControllerUnpublishVolume";
        self.require_shared(M)?;
        require("volume_id", &r.volume_id)?;
        let (id, node) = (r.volume_id, r.node_id);
        self.driver
            .run(M, vec![inflight::volume(&id)], move |pool| {
                if !node.is_empty() {
                    return Ok(pool.release_claim(&id, &node)?);
                }
                // No node: unpublish from every node.
                match pool.get_volume(&id) {
                    Ok(m) => {
                        for h in m.claims {
                            pool.release_claim(&id, &h.node)?;
                        }
                        Ok(())
                    }
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(Fail::Backend(e)),
                }
            })
            .await?;
        Ok(pb::ControllerUnpublishVolumeResponse {})
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let name = r.name.clone();
        let redact = caps::redactions(&r.volume_capabilities);
        log::call("CreateVolume", &name, redact, self.create_volume(r)).await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        log::call("DeleteVolume", &id.clone(), Redact::default(), async move {
            require("volume_id", &id)?;
            self.driver
                .run("DeleteVolume", vec![inflight::volume(&id)], move |pool| {
                    Ok(pool.delete_volume(&id)?)
                })
                .await?;
            Ok(pb::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let redact = caps::redactions(&r.volume_capability);
        log::call("ControllerPublishVolume", &id, redact, self.publish(r)).await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        log::call(
            "ControllerUnpublishVolume",
            &id,
            Redact::default(),
            self.unpublish(r),
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let redact = caps::redactions(&r.volume_capabilities);
        log::call(
            "ValidateVolumeCapabilities",
            &id,
            redact,
            self.validate_capabilities(r),
        )
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        log::call("ListVolumes", "", Redact::default(), async move {
            if r.max_entries < 0 {
                return Err(invalid("max_entries must not be negative"));
            }
            let token = Some(r.starting_token).filter(|t| !t.is_empty());
            let max = r.max_entries as usize;
            let (page, conditions) = self
                .driver
                .run("ListVolumes", Vec::new(), move |pool| {
                    let page = pool.list_volumes(token.as_deref(), max)?;
                    // VOLUME_CONDITION is advertised, so every entry must carry one.
                    let conditions = page
                        .entries
                        .iter()
                        .map(|m| pool.condition_of(m))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((page, conditions))
                })
                .await?;
            Ok(pb::ListVolumesResponse {
                entries: page
                    .entries
                    .iter()
                    .zip(conditions)
                    .map(|(m, c)| pb::list_volumes_response::Entry {
                        volume: Some(self.volume_pb(m)),
                        status: Some(pb::list_volumes_response::VolumeStatus {
                            published_node_ids: self.published_nodes(m),
                            volume_condition: Some(condition_pb(c)),
                        }),
                    })
                    .collect(),
                next_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let redact = caps::redactions(&r.volume_capabilities);
        log::call("GetCapacity", "", redact, self.get_capacity(r)).await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        log::call("ControllerGetCapabilities", "", Redact::default(), async {
            Ok(pb::ControllerGetCapabilitiesResponse {
                capabilities: self.capabilities(),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        const M: &str = "CreateSnapshot";
        let r = req.into_inner();
        let name = r.name.clone();
        log::call(M, &name, Redact::default(), async move {
            require("name", &r.name)?;
            require("source_volume_id", &r.source_volume_id)?;
            validate::check_name("snapshot name", &r.name).map_err(|e| to_status(M, e))?;
            params::snapshot(&r.parameters)?;
            let id = validate::id_for_name(&r.name);
            let (name, source) = (r.name, r.source_volume_id);
            let snap = self
                .driver
                .run(M, vec![inflight::snapshot(&id)], move |pool| {
                    Ok(pool.create_snapshot(&name, &source)?)
                })
                .await?;
            Ok(pb::CreateSnapshotResponse {
                snapshot: Some(snapshot_pb(&snap)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        log::call(
            "DeleteSnapshot",
            &id.clone(),
            Redact::default(),
            async move {
                require("snapshot_id", &id)?;
                self.driver
                    .run(
                        "DeleteSnapshot",
                        vec![inflight::snapshot(&id)],
                        move |pool| Ok(pool.delete_snapshot(&id)?),
                    )
                    .await?;
                Ok(pb::DeleteSnapshotResponse {})
            },
        )
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        log::call(
            "ListSnapshots",
            "",
            Redact::default(),
            self.list_snapshots(r),
        )
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        log::call("GetSnapshot", &id.clone(), Redact::default(), async move {
            require("snapshot_id", &id)?;
            let snap = self
                .driver
                .run("GetSnapshot", Vec::new(), move |pool| {
                    Ok(pool.get_snapshot(&id)?)
                })
                .await?;
            Ok(pb::GetSnapshotResponse {
                snapshot: Some(snapshot_pb(&snap)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let redact = caps::redactions(&r.volume_capability);
        log::call("ControllerExpandVolume", &id, redact, self.expand(r)).await
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        log::call(
            "ControllerGetVolume",
            &id.clone(),
            Redact::default(),
            async move {
                require("volume_id", &id)?;
                let (meta, condition) = self
                    .driver
                    .run("ControllerGetVolume", Vec::new(), move |pool| {
                        let meta = pool.get_volume(&id)?;
                        let condition = pool.volume_condition(&id)?;
                        Ok((meta, condition))
                    })
                    .await?;
                Ok(pb::ControllerGetVolumeResponse {
                    volume: Some(self.volume_pb(&meta)),
                    status: Some(pb::controller_get_volume_response::VolumeStatus {
                        published_node_ids: self.published_nodes(&meta),
                        volume_condition: Some(condition_pb(condition)),
                    }),
                })
            },
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        log::call(
            "ControllerModifyVolume",
            &id,
            Redact::default(),
            async move {
                require("volume_id", &r.volume_id)?;
                // Every parameter is checked before anything is applied.
                let allocation = params::modify(&r.mutable_parameters)?;
                let id = r.volume_id;
                self.driver
                    .run(
                        "ControllerModifyVolume",
                        vec![inflight::volume(&id)],
                        move |pool| {
                            match allocation {
                                Some(a) => pool.set_allocation(&id, a)?,
                                None => pool.get_volume(&id)?,
                            };
                            Ok(())
                        },
                    )
                    .await?;
                Ok(pb::ControllerModifyVolumeResponse {})
            },
        )
        .await
    }
}
