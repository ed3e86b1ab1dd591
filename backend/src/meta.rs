//! Volume and snapshot metadata: what *should* exist. Written atomically (temp file, fsync,
//! rename, fsync of the directory) so a crash leaves either the old or the new record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::validate::FsType;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Sparse image: space is taken as data is written.
    #[default]
    Thin,
    /// Every block allocated up front (fallocate): writes never fail for lack of pool space.
    Thick,
}

impl std::str::FromStr for Allocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "thin" => Ok(Allocation::Thin),
            "thick" => Ok(Allocation::Thick),
            other => Err(Error::invalid(
                "allocation",
                format!("{other:?} (thin or thick)"),
            )),
        }
    }
}

impl Allocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Thin => "thin",
            Allocation::Thick => "thick",
        }
    }
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "id")]
pub enum VolumeSource {
    Snapshot(String),
    Volume(String),
}

/// How a node uses a volume it holds (staged or claimed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    /// Read-write, one node at a time.
    SingleNodeWriter,
    /// Read-only; any number of nodes.
    ReadOnly,
    /// Read-write on many nodes at once: only for block volumes whose users coordinate.
    MultiNodeWriter,
}

impl AccessMode {
    /// Whether a holder in mode `self` on one node tolerates a holder in `other` on another node.
    pub fn shares_with(self, other: AccessMode) -> bool {
        use AccessMode::*;
        matches!(
            (self, other),
            (ReadOnly, ReadOnly) | (MultiNodeWriter, MultiNodeWriter)
        )
    }
}

/// A node's hold on a volume: a controller claim (CSI ControllerPublish, FlexVolume attach) or a
/// node's staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub node: String,
    pub mode: AccessMode,
    /// The PV the claim was made for: FlexVolume's `detach` names only the PV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pv_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub schema: u32,
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    /// The filesystem to create on first stage; `None` for a volume created for raw block use
    /// or with no preference (then the stage request decides).
    #[serde(default)]
    pub fs_type: Option<FsType>,
    #[serde(default)]
    pub allocation: Allocation,
    #[serde(default)]
    pub source: Option<VolumeSource>,
    /// For a node-local pool: the node whose pool holds the image.
    #[serde(default)]
    pub node: Option<String>,
    pub created_unix: u64,
    /// Controller claims (who may attach it).
    #[serde(default)]
    pub claims: Vec<Hold>,
    /// Nodes that have it staged now.
    #[serde(default)]
    pub staged: Vec<Hold>,
    /// Set while loopvol formats the volume: a crash mid-mkfs leaves a partial filesystem that
    /// must be formatted again, not mistaken for user data (or refused as such).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatting: Option<FsType>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub schema: u32,
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub fs_type: Option<FsType>,
    pub created_unix: u64,
    /// Set for members of a group snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads a JSON record; `Ok(None)` when the file does not exist.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context(|| format!("read {}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Metadata {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Replaces `path` with `value` atomically and durably.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().expect("metadata lives in a directory");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().expect("file name").to_string_lossy()
    ));
    let json = serde_json::to_vec_pretty(value).expect("metadata serializes");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .context(|| format!("create {}", tmp.display()))?;
    file.write_all(&json)
        .context(|| format!("write {}", tmp.display()))?;
    file.sync_all()
        .context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename or create in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        assert!(read::<VolumeMeta>(&path).unwrap().is_none());
        let meta = VolumeMeta {
            schema: SCHEMA_VERSION,
            id: "v".into(),
            name: "v".into(),
            size_bytes: 1 << 30,
            fs_type: Some(FsType::Xfs),
            allocation: Allocation::Thin,
            source: Some(VolumeSource::Snapshot("s".into())),
            node: Some("n1".into()),
            created_unix: 1,
            claims: vec![Hold {
                node: "n1".into(),
                mode: AccessMode::ReadOnly,
                pv_name: Some("pv".into()),
            }],
            staged: vec![],
            formatting: None,
        };
        write(&path, &meta).unwrap();
        assert_eq!(read::<VolumeMeta>(&path).unwrap().unwrap(), meta);
        assert!(!dir.path().join(".meta.json.tmp").exists());
        std::fs::write(&path, b"{not json").unwrap();
        let err = read::<VolumeMeta>(&path).unwrap_err();
        assert!(err.to_string().contains("corrupt metadata"));
    }

    #[test]
    fn sharing_rules() {
        use AccessMode::*;
        assert!(ReadOnly.shares_with(ReadOnly));
        assert!(MultiNodeWriter.shares_with(MultiNodeWriter));
        assert!(!SingleNodeWriter.shares_with(ReadOnly));
        assert!(!ReadOnly.shares_with(SingleNodeWriter));
        assert!(!SingleNodeWriter.shares_with(SingleNodeWriter));
    }
}
