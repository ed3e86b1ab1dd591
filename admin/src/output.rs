//! Tables for people, JSON for programs, and the JSON shapes of what a scan reports (one place,
//! so `list`, `inspect` and `check` describe a volume or a finding the same way).

use loopvol::inspect::{Finding, MountKind, SnapshotReport, VolumeReport};
use loopvol::Hold;
use serde_json::{json, Value};

/// Prints `value` as one JSON document on stdout.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a JSON value serializes")
    );
}

/// A table: a header row and rows, columns padded to their widest cell.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let last = cells.len() - 1;
            let mut out = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                out.push_str(c);
                if i < last {
                    out.push_str(&" ".repeat(w - c.chars().count() + 2));
                }
            }
            out.trim_end().to_owned()
        };
        let mut out = line(self.header.clone());
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// A byte count for people: `1.0 GiB`, `12.5 MiB`, `512 B`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss, reason = "one decimal shown")]
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `node:rw` for a hold.
fn hold(h: &Hold) -> String {
    let mode = match h.mode {
        loopvol::AccessMode::ReadOnly => "ro",
        loopvol::AccessMode::SingleNodeWriter => "rw",
        loopvol::AccessMode::MultiNodeWriter => "multi",
    };
    format!("{}:{mode}", h.node)
}

/// The holders column: staging holds, then controller claims.
pub fn holders(v: &VolumeReport) -> String {
    let mut parts: Vec<String> = v
        .meta
        .staged
        .iter()
        .map(|h| format!("{} staged", hold(h)))
        .collect();
    parts.extend(v.meta.claims.iter().map(|h| format!("{} claim", hold(h))));
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The health column: `ok`, or the reason.
pub fn health(v: &VolumeReport) -> String {
    match v.condition.reason {
        Some(r) if v.condition.abnormal => r.as_str().to_owned(),
        _ if v.condition.abnormal => "abnormal".to_owned(),
        _ => "ok".to_owned(),
    }
}

fn holds_json(holds: &[Hold]) -> Value {
    holds
        .iter()
        .map(|h| json!({"node": h.node.as_str(), "mode": h.mode, "pv_name": h.pv_name}))
        .collect()
}

/// A volume as `list --json` and `inspect --json` describe it.
pub fn volume_json(v: &VolumeReport) -> Value {
    json!({
        "id": v.meta.id.as_str(),
        "name": v.meta.name,
        "size_bytes": v.meta.size_bytes,
        "allocated_bytes": v.image.as_ref().map(|i| i.allocated_bytes),
        "fs_type": v.meta.fs_type.map(|f| f.as_str()),
        "allocation": v.meta.allocation.as_str(),
        "state": v.state.as_str(),
        "staged": holds_json(&v.meta.staged),
        "claims": holds_json(&v.meta.claims),
        "health": {
            "abnormal": v.condition.abnormal,
            "reason": v.condition.reason.map(|r| r.as_str()),
            "message": v.condition.message,
        },
    })
}

/// A volume's loop devices and mounts on this node.
pub fn kernel_json(v: &VolumeReport) -> Value {
    json!({
        "image": v.image.as_ref().map(|i| json!({
            "path": i.path,
            "size_bytes": i.size_bytes,
            "allocated_bytes": i.allocated_bytes,
        })),
        "devices": v.devices.iter().map(|d| json!({
            "path": d.path,
            "backing_file": d.backing_file,
            "read_only": d.read_only,
        })).collect::<Vec<_>>(),
        "mounts": v.mounts.iter().map(|m| json!({
            "mount_point": m.mount_point,
            "device": m.device,
            "fs_type": m.fs_type,
            "read_only": m.read_only,
            "kind": mount_kind(m.kind),
        })).collect::<Vec<_>>(),
    })
}

pub fn mount_kind(k: MountKind) -> &'static str {
    match k {
        MountKind::Filesystem => "filesystem",
        MountKind::DeviceBind => "device-bind",
    }
}

pub fn snapshot_json(s: &SnapshotReport) -> Value {
    json!({
        "id": s.meta.id.as_str(),
        "name": s.meta.name,
        "source_volume_id": s.meta.source_volume_id.as_str(),
        "size_bytes": s.meta.size_bytes,
        "allocated_bytes": s.image.as_ref().map(|i| i.allocated_bytes),
        "fs_type": s.meta.fs_type.map(|f| f.as_str()),
        "group_id": s.meta.group_id.as_ref().map(|g| g.as_str()),
        "created_unix": s.meta.created_unix,
    })
}

pub fn finding_json(f: &Finding) -> Value {
    json!({
        "kind": f.kind.as_str(),
        "subject": f.subject,
        "volume": f.volume.as_ref().map(|v| v.as_str()),
        "why": f.why,
        "action": f.action,
        "gc_removes": f.fix.is_some(),
    })
}

/// A finding for people: its kind and subject, then why and what to do, indented.
pub fn finding_text(f: &Finding) -> String {
    format!(
        "{}  {}\n    why: {}\n    do:  {}",
        f.kind.as_str(),
        f.subject,
        f.why,
        f.action
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (bytes, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1 << 30, "1.0 GiB"),
            (u64::MAX, "16384.0 PiB"),
        ] {
            assert_eq!(size(bytes), want, "{bytes}");
        }
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["ID", "SIZE", "HEALTH"]);
        t.row(vec!["a".into(), "1.0 GiB".into(), "ok".into()]);
        t.row(vec!["longer-id".into(), "5 B".into(), "device_gone".into()]);
        assert_eq!(
            t.render(),
            "ID         SIZE     HEALTH\na          1.0 GiB  ok\nlonger-id  5 B      device_gone"
        );
    }
}
