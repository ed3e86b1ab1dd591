//! The Node service: stage (attach, format when blank, mount), publish (bind into the pod), their
//! reverses, stats, filesystem growth, and what this node is.

use std::path::PathBuf;
use std::sync::Arc;

use loopvol_proto::csi::v1 as pb;
use pb::node_service_capability::rpc::Type as Rpc;
use pb::volume_usage::Unit;
use tonic::{Request, Response, Status};

use crate::caps::{self, Capability};
use crate::error::{invalid, require};
use crate::inflight;
use crate::log::{self, Redact};
use crate::params::Range;
use crate::server::Driver;

pub struct Node {
    driver: Arc<Driver>,
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Node {
    pub fn new(driver: &Arc<Driver>) -> Self {
        Node {
            driver: Arc::clone(driver),
        }
    }

    fn capability(&self, cap: Option<&pb::VolumeCapability>) -> Result<Capability, Status> {
        let cap = cap.ok_or_else(|| invalid("volume_capability is required"))?;
        caps::parse(cap, self.driver.config.shared).map_err(|e| invalid(e.message()))
    }

    async fn stage(
        &self,
        r: pb::NodeStageVolumeRequest,
    ) -> Result<pb::NodeStageVolumeResponse, Status> {
        require("volume_id", &r.volume_id)?;
        require("staging_target_path", &r.staging_target_path)?;
        let cap = self.capability(r.volume_capability.as_ref())?;
        let (id, staging) = (r.volume_id, PathBuf::from(r.staging_target_path));
        self.driver
            .run(
                "NodeStageVolume",
                vec![inflight::volume(&id)],
                move |pool| Ok(pool.stage_with_mode(&id, &staging, &cap.access, cap.mode)?),
            )
            .await?;
        Ok(pb::NodeStageVolumeResponse {})
    }

    async fn publish(
        &self,
        r: pb::NodePublishVolumeRequest,
    ) -> Result<pb::NodePublishVolumeResponse, Status> {
        require("volume_id", &r.volume_id)?;
        require("target_path", &r.target_path)?;
        let cap = self.capability(r.volume_capability.as_ref())?;
        // STAGE_UNSTAGE_VOLUME is advertised, so the CO must stage first and name the path; the
        // spec's answer to a publish without it is FAILED_PRECONDITION ("stage it first"), after
        // the malformed-request checks above.
        if r.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is not set: STAGE_UNSTAGE_VOLUME is advertised, so the \
                 volume must be staged with NodeStageVolume first",
            ));
        }
        let read_only = r.readonly || cap.read_only();
        let (id, staging, target) = (
            r.volume_id,
            PathBuf::from(r.staging_target_path),
            PathBuf::from(r.target_path),
        );
        self.driver
            .run(
                "NodePublishVolume",
                vec![inflight::volume(&id)],
                move |pool| {
                    // SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): one workload at a time, so a
                    // second target while the first is still mounted is FAILED_PRECONDITION.
                    // The in-flight key holds the volume from this check to the publish.
                    if cap.single_workload {
                        if let Some(other) = pool.mounts_of(&id, &[&staging, &target])?.first() {
                            return Err(Status::failed_precondition(format!(
                                "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published \
                                 at {}; unpublish it there first",
                                other.display()
                            ))
                            .into());
                        }
                    }
                    Ok(pool.publish(
                        &id,
                        Some(&staging),
                        &target,
                        &cap.access,
                        read_only,
                        cap.mount_group,
                    )?)
                },
            )
            .await?;
        Ok(pb::NodePublishVolumeResponse {})
    }

    async fn stats(
        &self,
        r: pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, Status> {
        require("volume_id", &r.volume_id)?;
        require("volume_path", &r.volume_path)?;
        let (id, path) = (r.volume_id, PathBuf::from(r.volume_path));
        let (usage, condition) = self
            .driver
            .run("NodeGetVolumeStats", Vec::new(), move |pool| {
                let usage = pool.volume_usage(&id, &path)?;
                let condition = pool.volume_condition(&id)?;
                Ok((usage, condition))
            })
            .await?;
        let mut out = vec![pb::VolumeUsage {
            available: clamp(usage.available_bytes),
            total: clamp(usage.total_bytes),
            used: clamp(usage.used_bytes),
            unit: Unit::Bytes as i32,
        }];
        if let Some(inodes) = usage.inodes {
            out.push(pb::VolumeUsage {
                available: clamp(inodes.free),
                total: clamp(inodes.total),
                used: clamp(inodes.used),
                unit: Unit::Inodes as i32,
            });
        }
        Ok(pb::NodeGetVolumeStatsResponse {
            usage: out,
            volume_condition: Some(crate::controller::condition_pb(condition)),
        })
    }

    async fn expand(
        &self,
        r: pb::NodeExpandVolumeRequest,
    ) -> Result<pb::NodeExpandVolumeResponse, Status> {
        require("volume_id", &r.volume_id)?;
        require("volume_path", &r.volume_path)?;
        if let Some(c) = &r.volume_capability {
            caps::parse(c, self.driver.config.shared).map_err(|e| invalid(e.message()))?;
        }
        let range = Range::parse(r.capacity_range.as_ref())?;
        let shared = self.driver.config.shared;
        let (id, path) = (r.volume_id, PathBuf::from(r.volume_path));
        let size = self
            .driver
            .run(
                "NodeExpandVolume",
                vec![inflight::volume(&id)],
                move |pool| {
                    let m = pool.get_volume(&id)?;
                    if range.limit > 0 && m.size_bytes > range.limit {
                        return Err(Status::out_of_range(format!(
                            "volume {id} already has {} bytes, more than limit_bytes {}",
                            m.size_bytes, range.limit
                        ))
                        .into());
                    }
                    if shared {
                        // ControllerExpandVolume sizes volumes of a shared pool; the node only
                        // grows the filesystem to what the controller set.
                        if range.required > m.size_bytes {
                            return Err(Status::out_of_range(format!(
                                "volume {id} has {} bytes, less than the required {}; expand it \
                             with ControllerExpandVolume first",
                                m.size_bytes, range.required
                            ))
                            .into());
                        }
                        return Ok(pool.node_expand(&id, Some(&path))?);
                    }
                    // A node-local pool has no controller expansion: this node grows the image too.
                    let size = range.choose(m.size_bytes, 0)?;
                    Ok(pool.node_expand_to(&id, Some(&path), size)?)
                },
            )
            .await?;
        Ok(pb::NodeExpandVolumeResponse {
            capacity_bytes: clamp(size),
        })
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let redact = caps::redactions(&r.volume_capability);
        log::call("NodeStageVolume", &id, redact, self.stage(r)).await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        log::call("NodeUnstageVolume", &id, Redact::default(), async move {
            require("volume_id", &r.volume_id)?;
            require("staging_target_path", &r.staging_target_path)?;
            let (id, staging) = (r.volume_id, PathBuf::from(r.staging_target_path));
            self.driver
                .run(
                    "NodeUnstageVolume",
                    vec![inflight::volume(&id)],
                    move |pool| Ok(pool.unstage(&id, &staging)?),
                )
                .await?;
            Ok(pb::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let redact = caps::redactions(&r.volume_capability);
        log::call("NodePublishVolume", &id, redact, self.publish(r)).await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        log::call("NodeUnpublishVolume", &id, Redact::default(), async move {
            require("volume_id", &r.volume_id)?;
            require("target_path", &r.target_path)?;
            let (id, target) = (r.volume_id, PathBuf::from(r.target_path));
            self.driver
                .run(
                    "NodeUnpublishVolume",
                    vec![inflight::volume(&id)],
                    move |pool| Ok(pool.unpublish(&id, &target)?),
                )
                .await?;
            Ok(pb::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        log::call("NodeGetVolumeStats", &id, Redact::default(), self.stats(r)).await
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        let redact = caps::redactions(&r.volume_capability);
        log::call("NodeExpandVolume", &id, redact, self.expand(r)).await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        log::call("NodeGetCapabilities", "", Redact::default(), async {
            let rpcs = [
                Rpc::StageUnstageVolume,
                Rpc::GetVolumeStats,
                Rpc::ExpandVolume,
                Rpc::VolumeCondition,
                Rpc::SingleNodeMultiWriter,
                Rpc::VolumeMountGroup,
            ];
            Ok(pb::NodeGetCapabilitiesResponse {
                capabilities: rpcs
                    .into_iter()
                    .map(|t| pb::NodeServiceCapability {
                        r#type: Some(pb::node_service_capability::Type::Rpc(
                            pb::node_service_capability::Rpc { r#type: t as i32 },
                        )),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        log::call("NodeGetInfo", "", Redact::default(), async {
            Ok(pb::NodeGetInfoResponse {
                node_id: self.driver.config.node_id.clone(),
                max_volumes_per_node: self.driver.config.max_volumes_per_node,
                accessible_topology: self.driver.topology(),
            })
        })
        .await
    }
}
