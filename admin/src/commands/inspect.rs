//! `loopvol inspect ID`: everything about one volume (or snapshot): its metadata, its image, its
//! loop devices and every mount of them on this node, holds, claims, health and the reason for
//! any abnormal state, and the findings about it.

use serde_json::json;

use loopvol::inspect::{Scan, SnapshotReport, VolumeReport};

use crate::context::Context;
use crate::output::{self, size};
use crate::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The volume ID (or a snapshot ID).
    pub id: String,
}

pub fn run(ctx: &Context, args: &Args) -> Result<Outcome, String> {
    let scan = ctx.scan()?;
    if let Some(v) = scan.volumes.iter().find(|v| v.meta.id.as_str() == args.id) {
        volume(ctx, &scan, v);
        return Ok(Outcome::Clean);
    }
    if let Some(s) = scan
        .snapshots
        .iter()
        .find(|s| s.meta.id.as_str() == args.id)
    {
        snapshot(ctx, s);
        return Ok(Outcome::Clean);
    }
    // A corrupt record has no report, but its finding says why.
    if let Some(f) = scan
        .findings
        .iter()
        .find(|f| f.volume.as_ref().is_some_and(|v| v.as_str() == args.id))
    {
        return Err(format!(
            "volume {}: {} ({})",
            args.id,
            f.why,
            f.kind.as_str()
        ));
    }
    Err(format!(
        "no volume or snapshot {:?} in pool {}",
        args.id,
        scan.root.display()
    ))
}

fn volume(ctx: &Context, scan: &Scan, v: &VolumeReport) {
    let findings: Vec<_> = scan
        .findings
        .iter()
        .filter(|f| f.volume.as_ref() == Some(&v.meta.id))
        .collect();
    if ctx.json {
        output::print_json(&json!({
            "volume": output::volume_json(v),
            "metadata": v.meta,
            "node": scan.node.as_str(),
            "kernel": output::kernel_json(v),
            "findings": findings.iter().map(|f| output::finding_json(f)).collect::<Vec<_>>(),
        }));
        return;
    }
    let m = &v.meta;
    let none = || "-".to_owned();
    let mut lines = vec![
        format!("volume {} (name {:?})", m.id, m.name),
        format!(
            "  size:       {} ({} bytes), {}, filesystem {}",
            size(m.size_bytes),
            m.size_bytes,
            m.allocation.as_str(),
            m.fs_type.map_or("not yet chosen", |f| f.as_str())
        ),
        format!(
            "  source:     {}",
            match &m.source {
                Some(loopvol::VolumeSource::Snapshot(s)) => format!("snapshot {s}"),
                Some(loopvol::VolumeSource::Volume(s)) => format!("volume {s}"),
                None => "blank".into(),
            }
        ),
        format!(
            "  lives on:   {}",
            m.node
                .as_ref()
                .map_or("any node (shared pool)".to_owned(), |n| format!("node {n}"))
        ),
        format!(
            "  image:      {}",
            v.image.as_ref().map_or("missing".to_owned(), |i| format!(
                "{} ({} allocated of {})",
                i.path.display(),
                size(i.allocated_bytes),
                size(i.size_bytes)
            ))
        ),
        format!("  state here: {} (node {})", v.state.as_str(), scan.node),
    ];
    if m.formatting.is_some() {
        lines.push(
            "  formatting: an interrupted format is recorded; the next stage finishes it".into(),
        );
    }
    lines.push("  devices:".into());
    lines.extend(v.devices.iter().map(|d| {
        format!(
            "    {} {} backed by {}",
            d.path.display(),
            if d.read_only { "ro" } else { "rw" },
            d.backing_file.display()
        )
    }));
    if v.devices.is_empty() {
        lines.push(format!("    {}", none()));
    }
    lines.push("  mounts:".into());
    lines.extend(v.mounts.iter().map(|mt| {
        format!(
            "    {} {} {} ({} of {})",
            mt.mount_point.display(),
            mt.fs_type,
            if mt.read_only { "ro" } else { "rw" },
            output::mount_kind(mt.kind),
            mt.device.display()
        )
    }));
    if v.mounts.is_empty() {
        lines.push(format!("    {}", none()));
    }
    let holds = |hs: &[loopvol::Hold]| {
        if hs.is_empty() {
            return none();
        }
        hs.iter()
            .map(|h| {
                let pv = h
                    .pv_name
                    .as_ref()
                    .map(|p| format!(" (PV {p})"))
                    .unwrap_or_default();
                format!("{} {}{pv}", h.node, h.mode.describe())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    lines.push(format!("  staged on:  {}", holds(&m.staged)));
    lines.push(format!("  claimed by: {}", holds(&m.claims)));
    lines.push(format!(
        "  health:     {}",
        if v.condition.abnormal {
            format!("abnormal ({}): {}", output::health(v), v.condition.message)
        } else {
            "ok".into()
        }
    ));
    for f in &findings {
        lines.push(format!(
            "  finding:    {}",
            output::finding_text(f).replace('\n', "\n  ")
        ));
    }
    println!("{}", lines.join("\n"));
}

fn snapshot(ctx: &Context, s: &SnapshotReport) {
    if ctx.json {
        output::print_json(&json!({
            "snapshot": output::snapshot_json(s),
            "metadata": s.meta,
            "image": s.image.as_ref().map(|i| json!({
                "path": i.path,
                "size_bytes": i.size_bytes,
                "allocated_bytes": i.allocated_bytes,
            })),
        }));
        return;
    }
    let m = &s.meta;
    println!(
        "snapshot {} (name {:?})\n  source:     volume {}\n  size:       {} ({} bytes), filesystem {}\n  group:      {}\n  image:      {}",
        m.id,
        m.name,
        m.source_volume_id,
        size(m.size_bytes),
        m.size_bytes,
        m.fs_type.map_or("none", |f| f.as_str()),
        m.group_id.as_ref().map_or("-", |g| g.as_str()),
        s.image.as_ref().map_or("missing".to_owned(), |i| format!(
            "{} ({} allocated)",
            i.path.display(),
            size(i.allocated_bytes)
        )),
    );
}
