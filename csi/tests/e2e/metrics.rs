//! `/metrics` after known operations: the server's exposition, parsed strictly, counts exactly
//! what the test did (calls by method and code, ABORTED for a busy volume, formats, copies by
//! kind, lock waits) and its pool and volume gauges match the pool (and change when the kernel
//! state changes behind the driver's back). As root.

use std::net::SocketAddr;
use std::time::Duration;

use loopvol_e2e::csi::*;
use loopvol_e2e::openmetrics::{self, Exposition};
use loopvol_e2e::{pattern, poll_until, require_root, write_synced, Scratch};
use tonic::Code;

use crate::{kubelet, start, MIB};

fn scrape(addr: SocketAddr) -> Exposition {
    let (status, content_type, body) = openmetrics::scrape(addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    openmetrics::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// Scrapes until `ready` holds: the pool's gauges come from a scan made at most once a second.
fn scrape_until(addr: SocketAddr, what: &str, ready: impl Fn(&Exposition) -> bool) -> Exposition {
    poll_until(Duration::from_secs(20), what, || {
        let m = scrape(addr);
        ready(&m).then_some(m)
    })
}

fn calls(m: &Exposition, method: &str, code: &str) -> f64 {
    m.sum(
        "loopvol_csi_request_duration_seconds_count",
        &[("method", method), ("code", code)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_done() {
    if !require_root(&["mkfs.ext4", "blkid"]) {
        return;
    }
    let scratch = Scratch::new();
    let (server, mut csi) = start(&scratch, &["--metrics-address=127.0.0.1:0"]).await;
    let addr = server.metrics_address();
    let c = &mut csi;
    let cap = rwo("ext4");
    let root = scratch.pool().display().to_string();
    let pool = [("pool", root.as_str())];

    // Before anything: every state and reason is there, at 0.
    let m = scrape(addr);
    assert_eq!(m.value("loopvol_volumes", &[("state", "created")]), 0.0);
    assert_eq!(
        m.samples("loopvol_volumes_abnormal", &pool).len(),
        loopvol::AbnormalReason::ALL.len(),
        "every reason, untrusted_entry included"
    );

    let a = c.create("pvc-a", 32 * MIB, cap.clone()).await.volume_id;
    let b = c.create("pvc-b", 32 * MIB, cap.clone()).await.volume_id;
    let pa = kubelet(&scratch).pod_volume("p", &a);
    c.stage_and_publish(&pa, &cap).await;
    write_synced(&pa.target.join("data"), &pattern(MIB as usize, 3));
    let snap = ok(
        c.ctl.create_snapshot(snapshot_req("snap-1", &a)).await,
        "CreateSnapshot",
    )
    .snapshot
    .unwrap()
    .snapshot_id;
    let mut restore = create_req("pvc-restored", 32 * MIB, cap.clone());
    restore.volume_content_source = from_snapshot(&snap);
    ok(c.ctl.create_volume(restore).await, "restore");
    let mut clone = create_req("pvc-clone", 32 * MIB, cap.clone());
    clone.volume_content_source = from_volume(&a);
    ok(c.ctl.create_volume(clone).await, "clone");
    // Another process holds B's lock: the stage is ABORTED at once.
    let held = scratch.hold_volume_lock(&b);
    let staging_b = kubelet(&scratch).staging(&b);
    assert_code(
        c.node
            .node_stage_volume(stage_req(&b, &staging_b, cap.clone()))
            .await,
        Code::Aborted,
        "stage B while its lock is held",
    );
    drop(held);
    assert_code(
        c.ctl
            .controller_get_volume(get_volume_req("pvc-none"))
            .await,
        Code::NotFound,
        "an unknown volume",
    );
    let capacity = ok(
        c.ctl
            .get_capacity(pb::GetCapacityRequest {
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await,
        "GetCapacity",
    )
    .available_capacity;

    let m = scrape_until(addr, "the pool's gauges after the calls", |m| {
        m.value("loopvol_volumes", &[("state", "created")]) == 4.0
    });
    // Calls by method and code: exactly those made.
    for (method, code, n) in [
        ("CreateVolume", "OK", 4.0),
        ("NodeStageVolume", "OK", 1.0),
        ("NodeStageVolume", "ABORTED", 1.0),
        ("NodePublishVolume", "OK", 1.0),
        ("CreateSnapshot", "OK", 1.0),
        ("ControllerGetVolume", "NOT_FOUND", 1.0),
        ("GetCapacity", "OK", 1.0),
        ("DeleteVolume", "OK", 0.0),
    ] {
        assert_eq!(calls(&m, method, code), n, "{method} {code}");
    }
    assert_eq!(
        m.sum("loopvol_csi_request_duration_seconds_count", &[]),
        10.0,
        "every call is counted once"
    );
    assert!(m.sum("loopvol_csi_request_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(m.sum("loopvol_csi_requests_in_flight", &[]), 0.0);
    assert_eq!(
        m.value(
            "loopvol_csi_aborted_busy_total",
            &[("method", "NodeStageVolume"), ("cause", "lock")]
        ),
        1.0
    );
    assert_eq!(m.sum("loopvol_csi_aborted_busy_total", &[]), 1.0);
    // The backend's events.
    assert_eq!(
        m.value("loopvol_lock_waits_total", &[("outcome", "busy")]),
        1.0
    );
    assert_eq!(
        m.sum("loopvol_lock_waits_total", &[("outcome", "acquired")]),
        0.0
    );
    assert_eq!(
        m.value(
            "loopvol_format_duration_seconds_count",
            &[("fs", "ext4"), ("result", "ok")]
        ),
        1.0,
        "one volume was staged, so formatted, once"
    );
    for kind in ["snapshot", "restore", "clone"] {
        assert_eq!(
            m.sum("loopvol_copy_duration_seconds_count", &[("kind", kind)]),
            1.0,
            "{kind}"
        );
        assert!(
            m.sum("loopvol_copy_bytes_total", &[("kind", kind)]) >= MIB as f64,
            "a {kind} copy holds at least the 1 MiB written"
        );
    }
    // The pool and its volumes.
    for (state, n) in [("created", 4.0), ("staged", 1.0), ("published", 1.0)] {
        assert_eq!(
            m.value("loopvol_volumes", &[("state", state)]),
            n,
            "{state}"
        );
    }
    assert_eq!(m.value("loopvol_snapshots", &pool), 1.0);
    assert_eq!(m.sum("loopvol_volumes_abnormal", &pool), 0.0);
    // What admission may still promise, from the same look at the pool as its parts (other
    // tests write to the filesystem under the pool meanwhile, so GetCapacity, asked earlier, is
    // only close).
    let available = m.value("loopvol_pool_available_bytes", &pool);
    let free = m.value("loopvol_pool_free_bytes", &pool);
    let promised = m.value("loopvol_pool_thin_unallocated_bytes", &pool);
    // The space model keeps 1 % of the pool's filesystem (16 MiB to 1 GiB) out of every promise.
    let size = m.value("loopvol_pool_filesystem_size_bytes", &pool);
    let reserve = (size / 100.0)
        .floor()
        .clamp(16.0 * MIB as f64, 1024.0 * MIB as f64);
    assert_eq!(available, (free - reserve - promised).max(0.0));
    assert!(promised > 0.0, "four thin volumes have unwritten space");
    assert!(
        (available - capacity as f64).abs() < 0.05 * available,
        "GetCapacity {capacity} and the gauge {available} are far apart"
    );
    assert_eq!(m.value("loopvol_pool_overcommit_ratio", &pool), 1.0);
    assert_eq!(m.value("loopvol_pool_scan_success", &pool), 1.0);

    // The node restarts behind the driver's back: the volume is abnormal (device gone), and
    // no longer staged here.
    scratch.cleanup_kernel_state();
    let m = scrape_until(addr, "the vanished device in the gauges", |m| {
        m.value("loopvol_volumes_abnormal", &[("reason", "device_gone")]) == 1.0
    });
    assert_eq!(m.value("loopvol_volumes", &[("state", "staged")]), 0.0);
    c.unpublish_and_unstage(&pa).await;
    scratch.assert_clean("left behind");
}
