//! Pure decisions of the node path, kept apart from the kernel calls that carry them out so
//! each can be checked by a table test without root:
//! - [`format_plan`]: use, format, finish an interrupted format, or refuse (the most dangerous
//!   decision in the project: never format a device that may hold data);
//! - [`staging_mount`] and [`bind_flags`]: the mount(2) flags and data of a staging mount and
//!   of a publication;
//! - [`grow_plan`]: whether a staged filesystem must be grown to fill its device, and how.

use nix::mount::MsFlags;

use crate::fs::Content;
use crate::ids::VolumeId;
use crate::meta::VolumeSource;
use crate::validate::{FsType, FLAG_OPTIONS};

/// Flags every loopvol mount gets unless the caller's options say otherwise: a volume must not
/// smuggle device nodes or setuid binaries into a pod.
pub(crate) const DEFAULT_FLAGS: MsFlags = MsFlags::MS_NODEV.union(MsFlags::MS_NOSUID);

/// What the stage of a filesystem volume finds and is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FormatInputs<'a> {
    /// What `blkid -p` found on the device.
    pub content: &'a Content,
    /// The metadata's record of a format loopvol started and did not finish.
    pub in_progress: Option<FsType>,
    /// The filesystem the stage request asks for.
    pub requested: Option<FsType>,
    /// The filesystem recorded for the volume (at create, or at its first format).
    pub recorded: Option<FsType>,
    /// The stage is read-only (a read-only loop device: nothing can be written).
    pub read_only: bool,
    /// Bytes of data in the image (`SEEK_DATA`: written ranges, not holes or never-written
    /// allocations); `None` when the map cannot tell (it could not be read, or the pool's
    /// filesystem reports every byte as data, as one without `SEEK_DATA` support does).
    pub data_bytes: Option<u64>,
    /// The metadata records the volume as blank since its creation (`VolumeMeta::blank`): the
    /// witness when the data map cannot tell.
    pub recorded_blank: bool,
    /// The metadata records that the volume was used as a raw block device.
    pub raw_block: bool,
    /// What the volume was copied from, if anything.
    pub source: Option<&'a VolumeSource>,
}

/// What to do with a volume's device before mounting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormatPlan {
    /// Mount the filesystem that is there.
    Use(FsType),
    /// The device is blank: format it.
    Format(FsType),
    /// Our own mkfs was interrupted (the metadata says so): whatever it left is no data, so
    /// format over it.
    FinishInterruptedFormat(FsType),
    /// Touch nothing; the reason is the error's message.
    Refuse(String),
}

/// Decides what a stage does with the device of volume `id`. Formats only a device on which
/// `blkid` finds nothing *and* whose image provably holds no data (its data map shows none, or,
/// where the map cannot tell, the metadata records it blank since its creation), or the
/// leftovers of our own interrupted format. A volume ever used
/// as a raw block device is never formatted, nor one copied from a source whose data has no
/// filesystem. Anything else that is not a filesystem we mount is refused, and a filesystem of
/// another type than asked is never reformatted.
pub(crate) fn format_plan(id: &VolumeId, i: &FormatInputs<'_>) -> FormatPlan {
    let blank = *i.content == Content::Blank;
    if i.raw_block && !matches!(i.content, Content::Filesystem(_)) {
        return FormatPlan::Refuse(format!(
            "volume {id} was used as a raw block device and blkid finds no filesystem on it; \
             loopvol never formats such a volume, since whatever it holds would be lost. Use it \
             as a block volume, or copy its data off and create a new volume for a filesystem"
        ));
    }
    if i.read_only && (blank || i.in_progress.is_some()) {
        return FormatPlan::Refuse(format!(
            "volume {id} holds no filesystem yet and is staged read-only, so it cannot be formatted"
        ));
    }
    if blank {
        // Data the map shows is data, whatever the record says (it may have been written
        // outside loopvol); whatever our own interrupted mkfs wrote is no one's.
        let empty = match i.data_bytes {
            Some(bytes) => bytes == 0,
            None => i.recorded_blank,
        } || i.in_progress.is_some();
        if !empty {
            return FormatPlan::Refuse(refuse_unsigned_data(id, i));
        }
        let fs = i
            .requested
            .or(i.in_progress)
            .or(i.recorded)
            .unwrap_or(FsType::Ext4);
        return FormatPlan::Format(fs);
    }
    if let Some(interrupted) = i.in_progress {
        return FormatPlan::FinishInterruptedFormat(interrupted);
    }
    match i.content {
        Content::Blank => unreachable!("handled above"),
        Content::Filesystem(found) => {
            let Ok(have) = found.parse::<FsType>() else {
                return FormatPlan::Refuse(format!(
                    "volume {id} holds a {found} filesystem, which loopvol does not mount; refusing to touch it"
                ));
            };
            match i.requested {
                Some(want) if want != have => FormatPlan::Refuse(format!(
                    "volume {id} already holds a {have} filesystem; {want} was asked for and the volume will not be reformatted"
                )),
                _ => FormatPlan::Use(have),
            }
        }
        Content::Other(what) => FormatPlan::Refuse(format!(
            "volume {id} holds {what}, not a filesystem; refusing to format it"
        )),
    }
}

/// Why a device without a signature, whose image holds data, is not formatted.
fn refuse_unsigned_data(id: &VolumeId, i: &FormatInputs<'_>) -> String {
    let data = match i.data_bytes {
        Some(n) => format!("{n} bytes of data"),
        None => "data, as far as its data map can tell,".to_owned(),
    };
    match i.source {
        Some(source) => {
            let from = match source {
                VolumeSource::Snapshot(s) => format!("snapshot {s}"),
                VolumeSource::Volume(v) => format!("volume {v}"),
            };
            format!(
                "volume {id} was created from {from} and holds {data} but no filesystem blkid \
                 recognises (a copy of a raw block volume?); refusing to format it. Use it as a \
                 block volume, or create a new volume for a filesystem"
            )
        }
        None => format!(
            "volume {id} holds {data} but no filesystem blkid recognises (a damaged filesystem, \
             or data written outside loopvol); refusing to format it. Copy its image off for \
             recovery, or delete the volume"
        ),
    }
}

/// Splits options into mount(2) flags (starting from `base`, which options may override: `dev`
/// clears a default `nodev`) and the filesystem's data string.
pub(crate) fn split_options(base: MsFlags, options: &[String]) -> (MsFlags, String) {
    let mut flags = base;
    let mut data = Vec::new();
    for opt in options {
        let o = opt.as_str();
        match o {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "atime" => flags &= !MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "norelatime" => flags &= !MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "diratime" => flags &= !MsFlags::MS_NODIRATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "async" => flags &= !MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            "nolazytime" => flags &= !MsFlags::MS_LAZYTIME,
            "defaults" => {}
            _ => {
                debug_assert!(!FLAG_OPTIONS.contains(&o));
                data.push(o);
            }
        }
    }
    (flags, data.join(","))
}

/// How a staging mount is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    pub flags: MsFlags,
    pub data: String,
}

/// The staging mount of a `fs` filesystem: `nodev,nosuid` unless the caller's options say
/// otherwise, `ro` for a read-only stage, xfs' `nouuid` (clones share their source's UUID) and,
/// read-only, `norecovery` (a read-only device cannot replay a dirty log).
pub(crate) fn staging_mount(fs: FsType, read_only: bool, options: &[String]) -> MountPlan {
    let mut options = options.to_vec();
    if read_only {
        options.push("ro".into());
    }
    let (flags, data) = split_options(DEFAULT_FLAGS, &options);
    let mut parts: Vec<&str> = crate::fs::required_mount_data(fs).to_vec();
    if !data.is_empty() {
        parts.push(&data);
    }
    if read_only && fs == FsType::Xfs {
        parts.push("norecovery");
    }
    MountPlan {
        flags,
        data: parts.join(","),
    }
}

/// The flags of a publication (a bind remounted with them): `nodev,nosuid`, `ro` when asked, and
/// the caller's flag options (their data options belong to the staging mount). A raw block
/// publication must allow its device node, so never `nodev`.
pub(crate) fn bind_flags(block: bool, read_only: bool, options: &[String]) -> MsFlags {
    let mut flags = DEFAULT_FLAGS;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if block {
        return flags & !MsFlags::MS_NODEV;
    }
    let (extra, _) = split_options(MsFlags::empty(), options);
    flags | extra
}

/// How a staged filesystem catches up with a device that grew while it was not mounted (or while
/// an online grow could not run: ext4 without CAP_SYS_RESOURCE, a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrowPlan {
    Nothing,
    /// ext4: fsck and resize before the mount.
    OfflineBeforeMount,
    /// xfs and btrfs grow only mounted: right after the mount.
    OnlineAfterMount,
}

/// Whether the filesystem `fs` of `fs_size` bytes on a device of `device_size` bytes must grow.
/// A filesystem this stage just made, or a read-only one, never does.
pub(crate) fn grow_plan(
    fs: FsType,
    just_formatted: bool,
    read_only: bool,
    fs_size: Option<u64>,
    device_size: u64,
) -> GrowPlan {
    let behind =
        fs_size.is_some_and(|size| size.saturating_add(crate::fs::grow_slack(fs)) < device_size);
    if just_formatted || read_only || !behind {
        GrowPlan::Nothing
    } else if fs == FsType::Ext4 {
        GrowPlan::OfflineBeforeMount
    } else {
        GrowPlan::OnlineAfterMount
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fsys(name: &str) -> Content {
        Content::Filesystem(name.into())
    }

    /// Every case whose plan is not the expected one (a `Refuse` matches when its text
    /// contains the expected one's).
    fn wrong_plans<'a>(
        cases: impl IntoIterator<Item = (FormatInputs<'a>, &'a FormatPlan)>,
    ) -> Vec<String> {
        let id = VolumeId::try_from("v").unwrap();
        cases
            .into_iter()
            .filter_map(|(inputs, want)| {
                let got = format_plan(&id, &inputs);
                let ok = match (&got, want) {
                    (FormatPlan::Refuse(text), FormatPlan::Refuse(needle)) => {
                        text.contains(needle.as_str())
                    }
                    (got, want) => got == want,
                };
                (!ok).then(|| format!("{inputs:?}: got {got:?}, want {want:?}"))
            })
            .collect()
    }

    /// Every input combination that matters, with the plan it must give.
    #[test]
    fn format_plans() {
        use FormatPlan::*;
        use FsType::*;
        let gpt = Content::Other("partition table gpt".into());
        // (content, in progress, requested, recorded, read-only) → plan ("" = Refuse, with the
        // text it must contain)
        let refuse = |needle: &'static str| Refuse(needle.to_owned());
        type Row = (
            Content,
            Option<FsType>,
            Option<FsType>,
            Option<FsType>,
            bool,
            FormatPlan,
        );
        let table: Vec<Row> = vec![
            // Blank: format with the request, else the interrupted format's, else the recorded,
            // else ext4.
            (Content::Blank, None, None, None, false, Format(Ext4)),
            (Content::Blank, None, Some(Xfs), None, false, Format(Xfs)),
            (
                Content::Blank,
                None,
                None,
                Some(Btrfs),
                false,
                Format(Btrfs),
            ),
            (
                Content::Blank,
                None,
                Some(Xfs),
                Some(Btrfs),
                false,
                Format(Xfs),
            ),
            (
                Content::Blank,
                Some(Btrfs),
                None,
                Some(Ext4),
                false,
                Format(Btrfs),
            ),
            (
                Content::Blank,
                Some(Btrfs),
                Some(Xfs),
                None,
                false,
                Format(Xfs),
            ),
            // Read-only: nothing can be formatted.
            (
                Content::Blank,
                None,
                None,
                Some(Ext4),
                true,
                refuse("staged read-only"),
            ),
            (
                fsys("ext4"),
                Some(Ext4),
                None,
                None,
                true,
                refuse("staged read-only"),
            ),
            // Our own interrupted format: finish it, whatever it left.
            (
                fsys("ext4"),
                Some(Ext4),
                None,
                None,
                false,
                FinishInterruptedFormat(Ext4),
            ),
            (
                fsys("xfs"),
                Some(Ext4),
                Some(Xfs),
                None,
                false,
                FinishInterruptedFormat(Ext4),
            ),
            (
                gpt.clone(),
                Some(Xfs),
                None,
                None,
                false,
                FinishInterruptedFormat(Xfs),
            ),
            // A filesystem: use it, unless another type is asked for; never reformat.
            (fsys("ext4"), None, None, None, false, Use(Ext4)),
            (fsys("ext4"), None, Some(Ext4), Some(Xfs), false, Use(Ext4)),
            (fsys("xfs"), None, None, Some(Ext4), true, Use(Xfs)),
            (
                fsys("ext4"),
                None,
                Some(Xfs),
                None,
                false,
                refuse("already holds a ext4 filesystem"),
            ),
            (
                fsys("ntfs"),
                None,
                None,
                None,
                false,
                refuse("holds a ntfs filesystem"),
            ),
            (
                fsys("swap"),
                None,
                Some(Ext4),
                None,
                false,
                refuse("does not mount"),
            ),
            // Anything else is data.
            (
                gpt,
                None,
                Some(Ext4),
                None,
                false,
                refuse("partition table gpt, not a filesystem"),
            ),
            (
                Content::Other("an unknown signature".into()),
                None,
                None,
                None,
                false,
                refuse("refusing to format"),
            ),
        ];
        let cases = table.iter().map(
            |(content, in_progress, requested, recorded, read_only, want)| {
                let inputs = FormatInputs {
                    content,
                    in_progress: *in_progress,
                    requested: *requested,
                    recorded: *recorded,
                    read_only: *read_only,
                    // Provably empty: the witnesses have their own table below.
                    data_bytes: Some(0),
                    recorded_blank: false,
                    raw_block: false,
                    source: None,
                };
                (inputs, want)
            },
        );
        let wrong = wrong_plans(cases);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// blkid is not the only witness: a device without a signature is formatted only when its
    /// image holds no data (or is recorded blank, or our own format was interrupted), and never
    /// after a raw block use.
    #[test]
    fn formatting_needs_a_witness_of_no_data() {
        use FormatPlan::*;
        use FsType::*;
        let snap = VolumeSource::Snapshot(crate::SnapshotId::try_from("s1").unwrap());
        let vol = VolumeSource::Volume(VolumeId::try_from("v0").unwrap());
        let refuse = |needle: &'static str| Refuse(needle.to_owned());
        // (content, data bytes, recorded blank, raw block, source, in progress) → plan
        type Row<'a> = (
            Content,
            Option<u64>,
            bool,
            bool,
            Option<&'a VolumeSource>,
            Option<FsType>,
            FormatPlan,
        );
        let table: Vec<Row> = vec![
            // No data extent, or recorded blank where the map cannot tell: nothing to lose.
            (
                Content::Blank,
                Some(0),
                false,
                false,
                None,
                None,
                Format(Ext4),
            ),
            (Content::Blank, None, true, false, None, None, Format(Ext4)),
            // Data the map shows is someone's, whatever the record says.
            (
                Content::Blank,
                Some(5),
                true,
                false,
                None,
                None,
                refuse("holds 5 bytes of data"),
            ),
            (
                Content::Blank,
                Some(0),
                false,
                false,
                Some(&snap),
                None,
                Format(Ext4),
            ),
            // Data without a signature: refused, saying where it came from.
            (
                Content::Blank,
                Some(4096),
                false,
                false,
                None,
                None,
                refuse("holds 4096 bytes of data but no filesystem"),
            ),
            (
                Content::Blank,
                None,
                false,
                false,
                None,
                None,
                refuse("as far as its data map can tell"),
            ),
            (
                Content::Blank,
                Some(1 << 20),
                false,
                false,
                Some(&snap),
                None,
                refuse("created from snapshot s1"),
            ),
            (
                Content::Blank,
                Some(1 << 20),
                false,
                false,
                Some(&vol),
                None,
                refuse("created from volume v0"),
            ),
            // Our own interrupted format wrote what is there.
            (
                Content::Blank,
                Some(8192),
                false,
                false,
                None,
                Some(Xfs),
                Format(Xfs),
            ),
            // A raw block device's content is never formatted, whatever else says so.
            (
                Content::Blank,
                Some(0),
                true,
                true,
                None,
                None,
                refuse("was used as a raw block device"),
            ),
            (
                Content::Blank,
                Some(0),
                false,
                true,
                None,
                Some(Ext4),
                refuse("never formats such a volume"),
            ),
            (
                Content::Other("partition table dos".into()),
                Some(1),
                false,
                true,
                None,
                None,
                refuse("raw block device"),
            ),
            // A filesystem the workload made on its block device is used, not formatted.
            (
                fsys("ext4"),
                Some(1 << 20),
                false,
                true,
                None,
                None,
                Use(Ext4),
            ),
        ];
        let cases = table.iter().map(
            |(content, data_bytes, recorded_blank, raw_block, source, in_progress, want)| {
                let inputs = FormatInputs {
                    content,
                    in_progress: *in_progress,
                    requested: None,
                    recorded: None,
                    read_only: false,
                    data_bytes: *data_bytes,
                    recorded_blank: *recorded_blank,
                    raw_block: *raw_block,
                    source: *source,
                };
                (inputs, want)
            },
        );
        let wrong = wrong_plans(cases);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn splits_flags_from_data() {
        let (flags, data) = split_options(
            MsFlags::empty(),
            &opts(&["ro", "noatime", "discard", "commit=30", "nodev"]),
        );
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | MsFlags::MS_NODEV));
        assert_eq!(data, "discard,commit=30");
        let (flags, _) = split_options(MsFlags::MS_NODEV, &opts(&["dev"]));
        assert!(!flags.contains(MsFlags::MS_NODEV));
    }

    #[test]
    fn staging_mounts() {
        use FsType::*;
        let base = DEFAULT_FLAGS;
        let ro = DEFAULT_FLAGS | MsFlags::MS_RDONLY;
        // (fs, read-only, caller options) → (flags, data)
        let table: &[(FsType, bool, &[&str], MsFlags, &str)] = &[
            (Ext4, false, &[], base, ""),
            (Ext4, true, &[], ro, ""),
            (Xfs, false, &[], base, "nouuid"),
            (Xfs, true, &[], ro, "nouuid,norecovery"),
            (Btrfs, false, &["compress=zstd:3"], base, "compress=zstd:3"),
            (
                Ext4,
                false,
                &["noatime", "commit=30"],
                base | MsFlags::MS_NOATIME,
                "commit=30",
            ),
            (
                Xfs,
                false,
                &["dev", "suid", "discard"],
                MsFlags::empty(),
                "nouuid,discard",
            ),
            // The caller's `rw` cannot undo a read-only stage: `ro` comes last.
            (Ext4, true, &["rw"], ro, ""),
            (Ext4, false, &["ro"], ro, ""),
        ];
        let rows = table.iter().map(|&(fs, ro, options, flags, data)| {
            let want = MountPlan {
                flags,
                data: data.to_owned(),
            };
            ((fs, ro, options), want)
        });
        crate::table::check(rows, |&(fs, ro, options)| {
            staging_mount(fs, ro, &opts(options))
        });
    }

    #[test]
    fn publication_flags() {
        let base = DEFAULT_FLAGS;
        // (block, read-only, caller options) → flags
        let table: &[(bool, bool, &[&str], MsFlags)] = &[
            (false, false, &[], base),
            (false, true, &[], base | MsFlags::MS_RDONLY),
            (
                false,
                false,
                &["noexec", "commit=30"],
                base | MsFlags::MS_NOEXEC,
            ),
            (true, false, &[], MsFlags::MS_NOSUID),
            (
                true,
                true,
                &["noexec"],
                MsFlags::MS_NOSUID | MsFlags::MS_RDONLY,
            ),
        ];
        let rows = table
            .iter()
            .map(|&(block, ro, options, want)| ((block, ro, options), want));
        crate::table::check(rows, |&(block, ro, options)| {
            bind_flags(block, ro, &opts(options))
        });
    }

    #[test]
    fn grow_plans() {
        use FsType::*;
        use GrowPlan::*;
        const MIB: u64 = 1 << 20;
        // (fs, just formatted, read-only, fs size, device size) → plan
        type Row = (FsType, bool, bool, Option<u64>, u64, GrowPlan);
        let table: &[Row] = &[
            (
                Ext4,
                false,
                false,
                Some(100 * MIB),
                200 * MIB,
                OfflineBeforeMount,
            ),
            (
                Xfs,
                false,
                false,
                Some(300 * MIB),
                400 * MIB,
                OnlineAfterMount,
            ),
            (
                Btrfs,
                false,
                false,
                Some(100 * MIB),
                200 * MIB,
                OnlineAfterMount,
            ),
            // Within the slack: nothing to do (xfs cannot use a tail under 16 MiB).
            (Xfs, false, false, Some(300 * MIB), 310 * MIB, Nothing),
            (Ext4, false, false, Some(200 * MIB), 200 * MIB, Nothing),
            (Ext4, true, false, Some(100 * MIB), 200 * MIB, Nothing),
            (Ext4, false, true, Some(100 * MIB), 200 * MIB, Nothing),
            (Ext4, false, false, None, 200 * MIB, Nothing),
        ];
        let rows = table
            .iter()
            .map(|&(fs, formatted, ro, size, device, want)| {
                ((fs, formatted, ro, size, device), want)
            });
        crate::table::check(rows, |&(fs, formatted, ro, size, device)| {
            grow_plan(fs, formatted, ro, size, device)
        });
    }
}
