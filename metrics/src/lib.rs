//! loopvol's pool and volume gauges, defined once for both places that export them:
//! `loopvol-csi --metrics-address` (`/metrics`, next to its RPC metrics) and `loopvol metrics
//! --textfile` (node-exporter's textfile collector, for FlexVolume-only nodes). Both fill them
//! from one [`loopvol::inspect::Census`], so the two exports are the same series.
//!
//! Every series carries the pool's path as the label `pool` (a node may serve several pools,
//! each with its own textfile).

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use loopvol::inspect::{Census, VolumeState};
use loopvol::AbnormalReason;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// What every metric name starts with.
pub const PREFIX: &str = "loopvol";

/// The volume states the gauge `loopvol_volumes` has, all always present.
pub const VOLUME_STATES: [VolumeState; 3] = [
    VolumeState::Created,
    VolumeState::Staged,
    VolumeState::Published,
];

type Bytes = Gauge<u64, AtomicU64>;
type Float = Gauge<f64, AtomicU64>;

/// The pool's gauges, registered in a registry.
#[derive(Debug, Clone, Default)]
pub struct PoolGauges {
    filesystem_size: Bytes,
    filesystem_used: Bytes,
    free: Bytes,
    thin_unallocated: Bytes,
    available: Bytes,
    overcommit: Float,
    volumes: Family<[(&'static str, &'static str); 1], Bytes>,
    abnormal: Family<[(&'static str, &'static str); 1], Bytes>,
    snapshots: Bytes,
    scan_duration: Float,
    scan_success: Bytes,
}

impl PoolGauges {
    /// Registers the gauges of the pool at `pool` (labelled with its path) in `registry`, whose
    /// names must start with [`PREFIX`]. `overcommit` is the factor the pool promises free space
    /// with.
    pub fn register(registry: &mut Registry, pool: &Path, overcommit: f64) -> PoolGauges {
        let g = PoolGauges::default();
        let r =
            registry.sub_registry_with_label(("pool".into(), pool.display().to_string().into()));
        r.register_with_unit(
            "pool_filesystem_size",
            "Size of the filesystem holding the pool",
            Unit::Bytes,
            g.filesystem_size.clone(),
        );
        r.register_with_unit(
            "pool_filesystem_used",
            "Bytes in use on the filesystem holding the pool (by anything)",
            Unit::Bytes,
            g.filesystem_used.clone(),
        );
        r.register_with_unit(
            "pool_free",
            "Bytes of the pool's filesystem available to the driver",
            Unit::Bytes,
            g.free.clone(),
        );
        r.register_with_unit(
            "pool_thin_unallocated",
            "Bytes promised to thin volumes that they have not written yet (size minus \
             allocated, summed over the pool's images)",
            Unit::Bytes,
            g.thin_unallocated.clone(),
        );
        r.register_with_unit(
            "pool_available",
            "Bytes a new volume may still be promised (admission): free x overcommit - thin \
             unallocated",
            Unit::Bytes,
            g.available.clone(),
        );
        r.register_with_unit(
            "pool_overcommit",
            "How many times the pool's free space may be promised to thin volumes",
            Unit::Other("ratio".into()),
            g.overcommit.clone(),
        );
        r.register(
            "volumes",
            "Volumes by state: created (in the pool, every node's), staged (held and attached \
             on this node), published (staged and used by a workload here)",
            g.volumes.clone(),
        );
        r.register(
            "volumes_abnormal",
            "Abnormal volumes by reason, as this node sees them",
            g.abnormal.clone(),
        );
        r.register("snapshots", "Snapshots in the pool", g.snapshots.clone());
        r.register_with_unit(
            "pool_scan_duration",
            "How long the last scan of the pool took",
            Unit::Seconds,
            g.scan_duration.clone(),
        );
        r.register(
            "pool_scan_success",
            "1 when the last scan of the pool finished in time, 0 when it failed or timed out \
             (the pool gauges then keep their last values)",
            g.scan_success.clone(),
        );
        g.overcommit.set(overcommit);
        // Every state and reason is a series from the start: alerts and sums see zeros, not
        // absent series.
        for s in VOLUME_STATES {
            drop(g.volumes.get_or_create(&[("state", s.as_str())]));
        }
        for r in AbnormalReason::ALL {
            drop(g.abnormal.get_or_create(&[("reason", r.as_str())]));
        }
        g
    }

    /// Sets every gauge from `census`, counted by a scan that took `took`.
    pub fn update(&self, census: &Census, took: Duration) {
        let cap = &census.capacity;
        self.filesystem_size.set(census.filesystem.size_bytes);
        self.filesystem_used.set(census.filesystem.used_bytes);
        self.free.set(cap.free_bytes);
        self.thin_unallocated.set(cap.thin_unallocated_bytes);
        self.available.set(cap.available_bytes);
        for (state, n) in [
            (VolumeState::Created, census.volumes),
            (VolumeState::Staged, census.staged),
            (VolumeState::Published, census.published),
        ] {
            self.volumes
                .get_or_create(&[("state", state.as_str())])
                .set(n);
        }
        for (reason, n) in &census.abnormal {
            self.abnormal
                .get_or_create(&[("reason", reason.as_str())])
                .set(*n);
        }
        self.snapshots.set(census.snapshots);
        self.scan_duration.set(took.as_secs_f64());
        self.scan_success.set(1);
    }

    /// The last scan failed or did not finish in time: the other gauges keep their values.
    pub fn scan_failed(&self) {
        self.scan_success.set(0);
    }
}

/// The registry's metrics in the OpenMetrics text format (ending in `# EOF`).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// A registry for loopvol's metrics (names start with `loopvol_`).
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopvol::inspect::FilesystemUsage;
    use loopvol::Capacity;

    #[test]
    fn gauges_render_every_state_and_reason() {
        let mut registry = registry();
        let g = PoolGauges::register(&mut registry, Path::new("/p o\"ol"), 1.5);
        let before = encode(&registry);
        assert!(
            before.contains(r#"loopvol_volumes_abnormal{pool="/p o\"ol",reason="device_gone"} 0"#),
            "{before}"
        );
        let mut abnormal: std::collections::BTreeMap<_, _> =
            AbnormalReason::ALL.iter().map(|r| (*r, 0)).collect();
        abnormal.insert(AbnormalReason::ImageMissing, 2);
        g.update(
            &Census {
                capacity: Capacity {
                    free_bytes: 100,
                    reserve_bytes: 16,
                    thick_unbacked_bytes: 0,
                    thin_unallocated_bytes: 30,
                    available_bytes: 120,
                    available_thick_bytes: 54,
                },
                filesystem: FilesystemUsage {
                    size_bytes: 1000,
                    used_bytes: 900,
                },
                volumes: 5,
                staged: 2,
                published: 1,
                snapshots: 3,
                abnormal,
            },
            Duration::from_millis(1500),
        );
        let text = encode(&registry);
        for line in [
            r#"loopvol_pool_filesystem_size_bytes{pool="/p o\"ol"} 1000"#,
            r#"loopvol_pool_filesystem_used_bytes{pool="/p o\"ol"} 900"#,
            r#"loopvol_pool_free_bytes{pool="/p o\"ol"} 100"#,
            r#"loopvol_pool_thin_unallocated_bytes{pool="/p o\"ol"} 30"#,
            r#"loopvol_pool_available_bytes{pool="/p o\"ol"} 120"#,
            r#"loopvol_pool_overcommit_ratio{pool="/p o\"ol"} 1.5"#,
            r#"loopvol_volumes{pool="/p o\"ol",state="created"} 5"#,
            r#"loopvol_volumes{pool="/p o\"ol",state="staged"} 2"#,
            r#"loopvol_volumes{pool="/p o\"ol",state="published"} 1"#,
            r#"loopvol_volumes_abnormal{pool="/p o\"ol",reason="image_missing"} 2"#,
            r#"loopvol_snapshots{pool="/p o\"ol"} 3"#,
            r#"loopvol_pool_scan_duration_seconds{pool="/p o\"ol"} 1.5"#,
            r#"loopvol_pool_scan_success{pool="/p o\"ol"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        g.scan_failed();
        assert!(encode(&registry).contains(r#"loopvol_pool_scan_success{pool="/p o\"ol"} 0"#));
    }
}
