//! Checks on untrusted input, done before anything touches a path, a lock or the kernel.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// Longest volume ID, snapshot ID or name (the CSI limit).
pub const MAX_ID_LEN: usize = 128;

/// A volume or snapshot ID (see [`crate::VolumeId`]): becomes a directory name in the pool, so it
/// must be one plain path component. Letters, digits, `-`, `_` and `.`, not starting with `.` (hides it, and rules out `..`).
pub fn check_id(what: &'static str, id: &str) -> Result<()> {
    check_name(what, id)?;
    if id.starts_with('.') {
        return Err(Error::invalid(
            what,
            format!("{id:?} must not start with '.'"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(Error::invalid(
            what,
            format!(
                "{:?} contains {c:?}; only letters, digits, '-', '_' and '.' are allowed",
                id.escape_debug().to_string()
            ),
        ));
    }
    Ok(())
}

/// Not empty, at most `max` bytes.
pub(crate) fn check_length(what: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            what,
            format!("{} bytes, longer than {max}", value.len()),
        ));
    }
    Ok(())
}

/// A name chosen by the caller (CSI's idempotency key). Any UTF-8 up to 128 bytes without NUL.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    check_length(what, name, MAX_ID_LEN)?;
    if name.contains('\0') {
        return Err(Error::invalid(what, "contains a NUL byte"));
    }
    Ok(())
}

/// Filesystems loopvol formats and mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Xfs, FsType::Btrfs];

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// Parses a requested fs type; empty means the default, ext4.
    pub fn parse_or_default(s: &str) -> Result<FsType> {
        if s.is_empty() {
            Ok(FsType::Ext4)
        } else {
            s.parse()
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            "btrfs" => Ok(FsType::Btrfs),
            other => Err(Error::invalid(
                "filesystem type",
                format!("{other:?} is not supported (ext4, xfs, btrfs)"),
            )),
        }
    }
}

/// Parses a Kubernetes quantity (`1Gi`, `500M`, `1073741824`, `1.5Gi`) into bytes.
pub fn parse_quantity(s: &str) -> Result<u64> {
    let bad = |reason: &str| Error::invalid("size", format!("{s:?}: {reason}"));
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(bad("expected a number such as 1Gi"));
    }
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => {
            return Err(bad(
                "unknown suffix (use k, M, G, T, P, Ki, Mi, Gi, Ti, Pi)",
            ))
        }
    };
    // Exact decimal arithmetic: `1.5Gi` must be exactly 1.5 × 2^30 bytes.
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
        return Err(bad("malformed number"));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad("number too large"))?
    };
    let frac_digits = u32::try_from(frac.len()).map_err(|_| bad("malformed number"))?;
    let frac_scale = 10u128.pow(frac_digits);
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad("malformed number"))?
    };
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|w| w.checked_add(frac_value * multiplier / frac_scale))
        .ok_or_else(|| bad("too large"))?;
    let bytes = u64::try_from(bytes).map_err(|_| bad("too large"))?;
    if bytes == 0 {
        return Err(bad("must be greater than zero"));
    }
    Ok(bytes)
}

/// Mount flags loopvol turns into mount(2) flags; everything else is filesystem data.
pub(crate) const FLAG_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "nodev",
    "dev",
    "nosuid",
    "suid",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "sync",
    "async",
    "dirsync",
    "lazytime",
    "nolazytime",
    "defaults",
];

/// Options that would change what is mounted rather than how: never from a caller.
const FORBIDDEN_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "remount",
    "move",
    "loop",
    "offset",
    "sizelimit",
];

/// Keys whose value names a device or a file outside the volume (an external journal or log,
/// another device of a btrfs): a volume must never reach beyond its own image. The value need
/// not contain a `/` (the kernel resolves `logdev=sdb` from the working directory, and takes
/// `journal_dev=` as a device number).
const DEVICE_KEYS: &[&str] = &["device", "journal_dev", "journal_path", "logdev", "rtdev"];

/// Options that can crash or hang the node, or debugging aids that inject faults, with why:
/// (key, the value that is refused or `None` for any, why).
const DANGEROUS_OPTIONS: &[(&str, Option<&str>, &str)] = &[
    // ext2/3/4: the first filesystem error panics the kernel (a full thin pool can cause one).
    (
        "errors",
        Some("panic"),
        "panics the node on the first filesystem error",
    ),
    // btrfs: the same for its fatal errors.
    (
        "fatal_errors",
        Some("panic"),
        "panics the node on a fatal filesystem error",
    ),
    // ext4 debugging aids: abort the filesystem at mount, fake encryption, replay faults.
    ("abort", None, "aborts the filesystem (a debugging aid)"),
    ("test_dummy_encryption", None, "is a debugging aid"),
    ("fc_debug_force", None, "is a debugging aid"),
    (
        "fc_debug_max_replay",
        None,
        "injects journal replay faults (a debugging aid)",
    ),
    ("debug_want_extra_isize", None, "is a debugging aid"),
    // btrfs debugging aids (CONFIG_BTRFS_DEBUG / integrity checker): fragment every allocation,
    // verify every reference, check every write: fault injection and node-wide slowdowns.
    ("fragment", None, "injects fragmentation (a debugging aid)"),
    ("ref_verify", None, "is a debugging aid"),
    ("check_int", None, "is a debugging aid"),
    ("check_int_data", None, "is a debugging aid"),
    ("check_int_print_mask", None, "is a debugging aid"),
];

/// Checks user mount options. Each is a flag or `key=value` of a plain charset; anything naming a
/// path or a device (`device=`, `logdev=`, `journal_path=`, ...), changing the kind of mount, or
/// able to crash or hang the node (`errors=panic`, debugging aids) is refused, matched without
/// regard to case. Messages name the option's key, never its value (a value may be a secret).
pub fn check_mount_options(options: &[String]) -> Result<()> {
    for opt in options {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let shown: String = key
            .chars()
            .take(64)
            .collect::<String>()
            .escape_debug()
            .to_string();
        let bad = |reason: &str| Error::invalid("mount option", format!("\"{shown}\": {reason}"));
        if opt.is_empty() {
            return Err(Error::invalid("mount option", "empty"));
        }
        if opt.len() > 256 {
            return Err(bad("longer than 256 bytes"));
        }
        if !opt
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | ':' | '+'))
        {
            return Err(bad(
                "contains a character that is not allowed (letters, digits, '_-.=:+')",
            ));
        }
        let key_lower = key.to_ascii_lowercase();
        let value_lower = value.map(str::to_ascii_lowercase);
        if FORBIDDEN_OPTIONS.contains(&key_lower.as_str()) {
            return Err(bad("changes what is mounted; not allowed"));
        }
        if DEVICE_KEYS.contains(&key_lower.as_str()) {
            return Err(bad(
                "names a device or file outside the volume; not allowed",
            ));
        }
        if let Some((_, _, why)) = DANGEROUS_OPTIONS.iter().find(|(k, v, _)| {
            *k == key_lower && v.is_none_or(|v| value_lower.as_deref() == Some(v))
        }) {
            return Err(bad(&format!("{why}; not allowed")));
        }
    }
    Ok(())
}

/// Splits a comma-separated option string (FlexVolume's `mountOptions`), then checks it.
pub fn parse_mount_options(s: &str) -> Result<Vec<String>> {
    let options: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    check_mount_options(&options)?;
    Ok(options)
}

/// System directories that no volume may be mounted on or under (a caller asking for them is
/// confused or hostile).
const SYSTEM_DIRS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/proc",
    "/run/systemd",
    "/sbin",
    "/sys",
    "/usr",
];

/// The system directory `path` is in (or is), if any.
pub(crate) fn system_dir(path: &Path) -> Option<&'static str> {
    SYSTEM_DIRS.iter().find(|d| path.starts_with(d)).copied()
}

/// Checks a staging or target path from a caller: absolute, normalized (no `.`/`..`, no `//`, no
/// trailing `/`), no NUL, not `/` or a system directory, and (when `prefixes` is not empty) under
/// one of `prefixes`.
pub fn check_path(what: &'static str, path: &Path, prefixes: &[PathBuf]) -> Result<()> {
    let text = path.as_os_str().as_encoded_bytes();
    let shown = path.display();
    if text.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if text.contains(&0) {
        return Err(Error::invalid(what, "contains a NUL byte"));
    }
    if text.len() > 4096 {
        return Err(Error::invalid(what, "longer than 4096 bytes"));
    }
    if !path.is_absolute() {
        return Err(Error::invalid(what, format!("{shown} is not absolute")));
    }
    let normal = path
        .components()
        .skip(1)
        .all(|c| matches!(c, Component::Normal(_)));
    let rebuilt: PathBuf = path.components().collect();
    if !normal || rebuilt.as_os_str() != path.as_os_str() {
        return Err(Error::invalid(
            what,
            format!("{shown} is not normalized (no '.', '..', '//' or trailing '/')"),
        ));
    }
    if path == Path::new("/") {
        return Err(Error::invalid(what, "must not be /"));
    }
    if let Some(dir) = system_dir(path) {
        return Err(Error::invalid(
            what,
            format!("{shown} is in system directory {dir}"),
        ));
    }
    if !prefixes.is_empty() && !prefixes.iter().any(|p| path.starts_with(p) && path != p) {
        let allowed: Vec<String> = prefixes.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::invalid(
            what,
            format!(
                "{shown} is outside the allowed directories {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A group ID for a volume's root (a pod's fsGroup, CSI's `volume_mount_group`): decimal digits
/// only (no sign, no spaces), below 4294967295, which is `(gid_t)-1`: chown(2) reads it as
/// "leave the group as it is", so it would be accepted and do nothing.
pub fn parse_group_id(what: &'static str, s: &str) -> Result<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(
            what,
            format!("{s:?} is not a group ID (decimal digits only)"),
        ));
    }
    match s.parse::<u32>() {
        Ok(gid) if gid != u32::MAX => Ok(gid),
        _ => Err(Error::invalid(
            what,
            format!("{s} is not a group ID (at most {})", u32::MAX - 1),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        check_id("volume ID", "pvc-0a1b2c3d-4e5f").unwrap();
        check_id("volume ID", &"a".repeat(128)).unwrap();
        for bad in ["", "..", ".", "a/b", "../x", "a\0b", ".hidden", "a b", "é"] {
            assert!(check_id("volume ID", bad).is_err(), "{bad:?} accepted");
        }
        let too_long = "a".repeat(129);
        let err = check_id("volume ID", &too_long).unwrap_err().to_string();
        assert!(err.contains("longer than 128"), "{err}");
    }

    #[test]
    fn names() {
        assert!(check_name("name", "a\0b").is_err());
        check_name("name", &"é".repeat(64)).unwrap();
        assert!(check_name("name", &"é".repeat(65)).is_err());
        assert!(check_name("name", "").is_err());
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity("4096").unwrap(), 4096);
        assert_eq!(parse_quantity("100Ti").unwrap(), 100 << 40);
        for bad in [
            "",
            "0",
            "0Gi",
            "-1Gi",
            "1Xi",
            "Gi",
            "1..5Gi",
            "1.2.3",
            "99999999999999999999Pi",
            ".Gi",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fs_types() {
        assert_eq!(FsType::parse_or_default("").unwrap(), FsType::Ext4);
        assert_eq!("xfs".parse::<FsType>().unwrap(), FsType::Xfs);
        assert!("ntfs".parse::<FsType>().is_err());
        assert!("EXT4".parse::<FsType>().is_err());
    }

    #[test]
    fn mount_options() {
        parse_mount_options("noatime, discard,commit=30,compress=zstd:3,errors=remount-ro")
            .unwrap();
        // (option, accepted)
        let table = [
            ("noatime", true),
            ("errors=remount-ro", true),
            ("errors=continue", true),
            ("data=ordered", true),
            ("bind", false),
            ("BIND", false),
            ("remount", false),
            ("device=/dev/sda", false),
            ("device=sdb", false),
            ("logdev=/dev/x", false),
            ("LogDev=sdb", false),
            ("rtdev=sdc", false),
            ("journal_dev=2049", false),
            ("journal_path=x", false),
            ("errors=panic", false),
            ("ERRORS=PANIC", false),
            ("Errors=Panic", false),
            ("fatal_errors=panic", false),
            ("fatal_errors=bug", true),
            ("abort", false),
            ("test_dummy_encryption", false),
            ("fc_debug_max_replay=3", false),
            ("fragment=all", false),
            ("ref_verify", false),
            ("check_int", false),
            ("a b", false),
            ("x;y", false),
            ("loop", false),
            ("offset=4", false),
            ("", false),
        ];
        crate::table::check(table, |opt| check_mount_options(&[opt.to_string()]).is_ok());
        // Messages name the key, never the value (it may be a secret).
        for opt in [
            "password=hunter2;x",
            "errors=panic",
            "device=hunter2",
            "x b=hunter2",
        ] {
            let err = check_mount_options(&[opt.to_string()])
                .unwrap_err()
                .to_string();
            assert!(
                !err.contains("hunter2") && !err.contains("panic\""),
                "{opt}: {err}"
            );
            assert!(err.contains("mount option"), "{err}");
        }
    }

    #[test]
    fn paths() {
        let kubelet = [PathBuf::from("/var/lib/kubelet")];
        check_path(
            "target path",
            Path::new("/var/lib/kubelet/pods/x/volumes/v"),
            &kubelet,
        )
        .unwrap();
        check_path("target path", Path::new("/tmp/x"), &[]).unwrap();
        for bad in [
            "",
            "relative/p",
            "/",
            "/etc",
            "/etc/x",
            "/proc/1",
            "/sys",
            "/dev/sda",
            "/usr/lib/x",
            "/tmp/../etc",
            "/tmp/./x",
            "/tmp//x",
            "/tmp/x/",
        ] {
            assert!(
                check_path("target path", Path::new(bad), &[]).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(check_path("target path", Path::new("/tmp/x"), &kubelet).is_err());
        assert!(check_path("target path", Path::new("/var/lib/kubelet"), &kubelet).is_err());
        assert!(check_path("target path", Path::new("/var/lib/kubeletx/a"), &kubelet).is_err());
    }

    #[test]
    fn group_ids() {
        let rows = [
            ("0", Some(0)),
            ("2000", Some(2000)),
            ("4294967294", Some(u32::MAX - 1)),
            ("4294967295", None),
            ("4294967296", None),
            ("+5", None),
            ("-5", None),
            (" 5", None),
            ("5 ", None),
            ("", None),
            ("0x10", None),
            ("٣", None),
        ];
        crate::table::check(rows, |s| parse_group_id("group", s).ok());
    }
}
