//! The Node service: stage (attach, format when blank, mount), publish (bind into the pod), their
//! reverses, stats, filesystem growth, and what this node is.

use std::path::PathBuf;
use std::sync::Arc;

use loopvol::{Publish, VolumeId};
use loopvol_proto::csi::v1 as pb;
use pb::node_service_capability::rpc::Type as Cap;
use pb::volume_usage::Unit;
use tonic::{Request, Response, Status};

use crate::caps::{self, Capability};
use crate::convert::{self, clamp};
use crate::error::{invalid, require, OrStatus};
use crate::inflight;
use crate::log::serve;
use crate::params;
use crate::rpc::Rpc;
use crate::server::Driver;

pub struct Node {
    driver: Arc<Driver>,
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
        const RPC: Rpc = Rpc::NodeStageVolume;
        require("volume_id", &r.volume_id)?;
        require("staging_target_path", &r.staging_target_path)?;
        let cap = self.capability(r.volume_capability.as_ref())?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let staging = PathBuf::from(r.staging_target_path);
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                let staging = pool.node_path("staging path", staging)?;
                // A failed stage undoes what it did: the CO takes it for "not staged" and never
                // unstages it.
                let mut volume = pool.volume(&id)?;
                Ok(volume.stage_or_release(&staging, &cap.access, cap.mode)?)
            })
            .await?;
        Ok(pb::NodeStageVolumeResponse {})
    }

    async fn unstage(
        &self,
        r: pb::NodeUnstageVolumeRequest,
    ) -> Result<pb::NodeUnstageVolumeResponse, Status> {
        const RPC: Rpc = Rpc::NodeUnstageVolume;
        require("volume_id", &r.volume_id)?;
        require("staging_target_path", &r.staging_target_path)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let staging = PathBuf::from(r.staging_target_path);
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                let staging = pool.node_path("staging path", staging)?;
                Ok(pool.volume(&id)?.unstage(&staging)?)
            })
            .await?;
        Ok(pb::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        r: pb::NodePublishVolumeRequest,
    ) -> Result<pb::NodePublishVolumeResponse, Status> {
        const RPC: Rpc = Rpc::NodePublishVolume;
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
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let read_only = r.readonly || cap.read_only();
        let (staging, target) = (
            PathBuf::from(r.staging_target_path),
            PathBuf::from(r.target_path),
        );
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                let request = Publish {
                    staging: Some(pool.node_path("staging path", staging)?),
                    target: pool.node_path("target path", target)?,
                    access: cap.access,
                    read_only,
                    fs_group: cap.mount_group,
                    // SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): one workload at a time,
                    // enforced by the backend under the volume's lock.
                    exclusive: cap.single_workload,
                };
                Ok(pool.volume(&id)?.publish(&request)?)
            })
            .await?;
        Ok(pb::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        r: pb::NodeUnpublishVolumeRequest,
    ) -> Result<pb::NodeUnpublishVolumeResponse, Status> {
        const RPC: Rpc = Rpc::NodeUnpublishVolume;
        require("volume_id", &r.volume_id)?;
        require("target_path", &r.target_path)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let target = PathBuf::from(r.target_path);
        self.driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                let target = pool.node_path("target path", target)?;
                Ok(pool.volume(&id)?.unpublish(&target)?)
            })
            .await?;
        Ok(pb::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        r: pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, Status> {
        const RPC: Rpc = Rpc::NodeGetVolumeStats;
        require("volume_id", &r.volume_id)?;
        require("volume_path", &r.volume_path)?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let path = PathBuf::from(r.volume_path);
        // A read: no in-flight key, no lock (a poll never waits behind a stage), and a bound:
        // on a pool that hangs, the kernel's view alone answers, with the reason.
        let (work_id, work_path) = (id.clone(), path.clone());
        let stats = self
            .driver
            .run_bounded(RPC, move |pool| {
                Ok(pool.volume_stats_checked(&work_id, &work_path)?)
            })
            .await?;
        let (usage, condition) = match stats {
            Some(stats) => stats,
            None => {
                let reason = format!(
                    "the pool is not answering: reading volume {id} did not return within {:.0} s ({})",
                    loopvol::POOL_DEADLINE.as_secs_f64(),
                    self.driver.pool.root().display()
                );
                self.driver
                    .run_bounded(RPC, move |pool| {
                        Ok(pool.volume_stats_offline(&id, &path, reason)?)
                    })
                    .await?
                    .ok_or_else(|| {
                        Status::unavailable("the kernel's view of the volume did not answer either")
                    })?
            }
        };
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
            volume_condition: Some(convert::condition(condition)),
        })
    }

    async fn expand(
        &self,
        r: pb::NodeExpandVolumeRequest,
    ) -> Result<pb::NodeExpandVolumeResponse, Status> {
        const RPC: Rpc = Rpc::NodeExpandVolume;
        require("volume_id", &r.volume_id)?;
        require("volume_path", &r.volume_path)?;
        if let Some(c) = &r.volume_capability {
            caps::parse(c, self.driver.config.shared).map_err(|e| invalid(e.message()))?;
        }
        let size = params::range(RPC, r.capacity_range.as_ref())?;
        let id = VolumeId::try_from(r.volume_id).or_status(RPC)?;
        let path = PathBuf::from(r.volume_path);
        // On a shared pool ControllerExpandVolume sizes the image and the node only grows the
        // filesystem; a node-local pool has no controller expansion, so this node grows the
        // image too.
        let grow_image = !self.driver.config.shared;
        let size = self
            .driver
            .run(RPC, vec![inflight::volume(&id)], move |pool| {
                let mut volume = pool.volume(&id)?;
                let path = pool.node_path("volume path", path)?;
                Ok(volume.node_expand(Some(&path), size, grow_image)?)
            })
            .await?;
        Ok(pb::NodeExpandVolumeResponse {
            capacity_bytes: clamp(size),
        })
    }

    async fn capabilities(
        &self,
        _r: pb::NodeGetCapabilitiesRequest,
    ) -> Result<pb::NodeGetCapabilitiesResponse, Status> {
        let rpcs = [
            Cap::StageUnstageVolume,
            Cap::GetVolumeStats,
            Cap::ExpandVolume,
            Cap::VolumeCondition,
            Cap::SingleNodeMultiWriter,
            Cap::VolumeMountGroup,
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
    }

    async fn info(&self, _r: pb::NodeGetInfoRequest) -> Result<pb::NodeGetInfoResponse, Status> {
        Ok(pb::NodeGetInfoResponse {
            node_id: self.driver.config.node_id.to_string(),
            max_volumes_per_node: self.driver.config.max_volumes_per_node,
            accessible_topology: self.driver.topology(),
        })
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        serve(Rpc::NodeStageVolume, req, |r| self.stage(r)).await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        serve(Rpc::NodeUnstageVolume, req, |r| self.unstage(r)).await
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        serve(Rpc::NodePublishVolume, req, |r| self.publish(r)).await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        serve(Rpc::NodeUnpublishVolume, req, |r| self.unpublish(r)).await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        serve(Rpc::NodeGetVolumeStats, req, |r| self.stats(r)).await
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        serve(Rpc::NodeExpandVolume, req, |r| self.expand(r)).await
    }

    async fn node_get_capabilities(
        &self,
        req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        serve(Rpc::NodeGetCapabilities, req, |r| self.capabilities(r)).await
    }

    async fn node_get_info(
        &self,
        req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        serve(Rpc::NodeGetInfo, req, |r| self.info(r)).await
    }
}
