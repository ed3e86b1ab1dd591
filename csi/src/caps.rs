//! Volume capabilities (`VolumeCapability`) → what the backend understands: an [`Access`] (a
//! filesystem with its type and mount options, or the raw block device) and an [`AccessMode`].

use loopvol::{Access, AccessMode, FsType};
use loopvol_proto::csi::v1::volume_capability::access_mode::Mode;
use loopvol_proto::csi::v1::volume_capability::AccessType;
use loopvol_proto::csi::v1::VolumeCapability;

use crate::log::Redact;

/// A parsed capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: AccessMode,
    /// The pod's fsGroup to apply at publish (VOLUME_MOUNT_GROUP).
    pub mount_group: Option<u32>,
    /// SINGLE_NODE_SINGLE_WRITER: published at one target (one workload) at a time.
    pub single_workload: bool,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }

    pub fn fs_type(&self) -> Option<FsType> {
        match &self.access {
            Access::Mount { fs_type, .. } => *fs_type,
            Access::Block => None,
        }
    }

    pub fn read_only(&self) -> bool {
        self.mode == AccessMode::ReadOnly
    }
}

/// Why a capability was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapError {
    /// A required part is missing or garbled: INVALID_ARGUMENT wherever it appears.
    Malformed(String),
    /// Well formed, but loopvol cannot provide it: INVALID_ARGUMENT when asked to create or use
    /// it, "not confirmed" from ValidateVolumeCapabilities.
    Unsupported(String),
}

impl CapError {
    pub fn message(&self) -> &str {
        match self {
            CapError::Malformed(m) | CapError::Unsupported(m) => m,
        }
    }
}

/// Parses `cap` for a pool that is `shared` between nodes or not.
pub fn parse(cap: &VolumeCapability, shared: bool) -> Result<Capability, CapError> {
    let access_type = cap.access_type.as_ref().ok_or_else(|| {
        CapError::Malformed("volume capability has no access type (block or mount)".into())
    })?;
    let raw_mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| CapError::Malformed("volume capability has no access mode".into()))?
        .mode;
    let mode = Mode::try_from(raw_mode)
        .map_err(|_| CapError::Malformed(format!("unknown access mode {raw_mode}")))?;
    let block = matches!(access_type, AccessType::Block(_));
    let single_workload = mode == Mode::SingleNodeSingleWriter;
    let mode = match mode {
        Mode::Unknown => return Err(CapError::Malformed("access mode is UNKNOWN".into())),
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            AccessMode::SingleNodeWriter
        }
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => AccessMode::ReadOnly,
        Mode::MultiNodeMultiWriter if block && shared => AccessMode::MultiNodeWriter,
        Mode::MultiNodeMultiWriter => {
            return Err(CapError::Unsupported(if block {
                "MULTI_NODE_MULTI_WRITER needs a pool shared between nodes (--shared-pool)".into()
            } else {
                "MULTI_NODE_MULTI_WRITER is only supported for block volumes: a filesystem \
                 cannot be written by several nodes at once"
                    .into()
            }))
        }
        Mode::MultiNodeSingleWriter => {
            return Err(CapError::Unsupported(
                "MULTI_NODE_SINGLE_WRITER is not supported: readers on other nodes would see \
                 the filesystem change under them"
                    .into(),
            ))
        }
    };
    let (access, mount_group) = match access_type {
        AccessType::Block(_) => (Access::Block, None),
        AccessType::Mount(m) => {
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(
                    m.fs_type
                        .parse::<FsType>()
                        .map_err(|e| CapError::Unsupported(e.to_string()))?,
                )
            };
            loopvol::validate::check_mount_options(&m.mount_flags)
                .map_err(|e| CapError::Unsupported(e.to_string()))?;
            let group = if m.volume_mount_group.is_empty() {
                None
            } else {
                Some(
                    loopvol::validate::parse_group_id("volume_mount_group", &m.volume_mount_group)
                        .map_err(|e| CapError::Malformed(e.to_string()))?,
                )
            };
            (
                Access::Mount {
                    fs_type,
                    mount_options: m.mount_flags.clone(),
                },
                group,
            )
        }
    };
    Ok(Capability {
        access,
        mode,
        mount_group,
        single_workload,
    })
}

/// What to scrub from logs and messages for a request carrying `caps`.
pub fn redactions<'a>(caps: impl IntoIterator<Item = &'a VolumeCapability>) -> Redact {
    let flags: Vec<String> = caps
        .into_iter()
        .filter_map(|c| match &c.access_type {
            Some(AccessType::Mount(m)) => Some(m.mount_flags.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    Redact::mount_flags(&flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopvol_proto::csi::v1::volume_capability::{
        AccessMode as PbMode, BlockVolume, MountVolume,
    };

    fn cap(block: bool, mode: Mode, fs: &str, flags: &[&str]) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                    volume_mount_group: String::new(),
                })
            }),
            access_mode: Some(PbMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn modes() {
        let c = parse(
            &cap(false, Mode::SingleNodeWriter, "xfs", &["noatime"]),
            false,
        )
        .unwrap();
        assert_eq!(c.mode, AccessMode::SingleNodeWriter);
        assert_eq!(c.fs_type(), Some(FsType::Xfs));
        let c = parse(&cap(false, Mode::MultiNodeReaderOnly, "", &[]), false).unwrap();
        assert!(c.read_only());
        assert_eq!(c.fs_type(), None);
        assert!(parse(&cap(true, Mode::SingleNodeMultiWriter, "", &[]), false).is_ok());
        assert!(matches!(
            parse(&cap(true, Mode::MultiNodeMultiWriter, "", &[]), false),
            Err(CapError::Unsupported(_))
        ));
        assert_eq!(
            parse(&cap(true, Mode::MultiNodeMultiWriter, "", &[]), true)
                .unwrap()
                .mode,
            AccessMode::MultiNodeWriter
        );
        assert!(matches!(
            parse(&cap(false, Mode::MultiNodeMultiWriter, "", &[]), true),
            Err(CapError::Unsupported(_))
        ));
        assert!(matches!(
            parse(&cap(false, Mode::Unknown, "", &[]), true),
            Err(CapError::Malformed(_))
        ));
    }

    #[test]
    fn fs_and_flags() {
        assert!(matches!(
            parse(&cap(false, Mode::SingleNodeWriter, "ntfs", &[]), false),
            Err(CapError::Unsupported(_))
        ));
        assert!(matches!(
            parse(
                &cap(false, Mode::SingleNodeWriter, "ext4", &["bind"]),
                false
            ),
            Err(CapError::Unsupported(_))
        ));
        let none = VolumeCapability {
            access_type: None,
            access_mode: Some(PbMode { mode: 1 }),
        };
        assert!(matches!(parse(&none, false), Err(CapError::Malformed(_))));
        let mut c = cap(false, Mode::SingleNodeWriter, "", &[]);
        if let Some(AccessType::Mount(m)) = &mut c.access_type {
            m.volume_mount_group = "abc".into();
        }
        assert!(matches!(parse(&c, false), Err(CapError::Malformed(_))));
        if let Some(AccessType::Mount(m)) = &mut c.access_type {
            m.volume_mount_group = "2000".into();
        }
        assert_eq!(parse(&c, false).unwrap().mount_group, Some(2000));
        // (gid_t)-1 means "leave the group" to chown, and a sign is not a group ID.
        for bad in ["4294967295", "+5", "-1", " 7"] {
            if let Some(AccessType::Mount(m)) = &mut c.access_type {
                m.volume_mount_group = bad.into();
            }
            assert!(
                matches!(parse(&c, false), Err(CapError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
