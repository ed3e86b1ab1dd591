//! The JSON options argument: kubelet's `kubernetes.io/*` keys merged with the PV's `options`
//! map. Everything is parsed and validated here, before any call touches the pool, so a bad input
//! changes nothing. Secret values (`kubernetes.io/secret/*`) are kept out of every log line.

use std::collections::BTreeMap;
use std::fmt;

use loopvol::validate::{self, FsType};
use serde_json::{Map, Value};

pub const VOLUME_ID: &str = "volumeID";
pub const SIZE: &str = "size";
pub const MOUNT_OPTIONS: &str = "mountOptions";
pub const FS_TYPE: &str = "kubernetes.io/fsType";
pub const READ_WRITE: &str = "kubernetes.io/readwrite";
pub const PV_OR_VOLUME_NAME: &str = "kubernetes.io/pvOrVolumeName";
pub const FS_GROUP: &str = "kubernetes.io/mounterArgs.FsGroup";
/// The key before Kubernetes 1.15.
pub const FS_GROUP_OLD: &str = "kubernetes.io/fsGroup";
pub const SECRET_PREFIX: &str = "kubernetes.io/secret/";

/// Why the options cannot be used. Messages name keys, never values (a value may be a secret).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed: not JSON, not an object, a value of the wrong kind, no volume named.
    #[error("{0}")]
    Invalid(String),
    /// A value the backend's validation refused (volume ID, size, fs type, mount options...).
    #[error(transparent)]
    Value(#[from] loopvol::Error),
}

impl Error {
    fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid(message.into())
    }
}

/// The options as kubelet sent them: string keys to string values.
#[derive(Clone, PartialEq, Eq)]
pub struct Options {
    map: BTreeMap<String, String>,
}

impl Options {
    /// Parses the JSON argument. It must be an object; values must be strings (numbers and
    /// booleans, which hand-written calls use, are taken as their text).
    pub fn parse(json: &str) -> Result<Options, Error> {
        let value: Value = serde_json::from_str(json).map_err(|e| {
            // serde_json's message names the position, never the content: nothing secret leaks.
            Error::invalid(format!("the options argument is not valid JSON: {e}"))
        })?;
        let Value::Object(object) = value else {
            return Err(Error::invalid(format!(
                "the options argument must be a JSON object, not {}",
                kind_of(&value)
            )));
        };
        Options::from_map(&object)
    }

    /// The options of a JSON object, with the rule for values [`Options::parse`] applies.
    pub fn from_map(object: &Map<String, Value>) -> Result<Options, Error> {
        let mut map = BTreeMap::new();
        for (key, value) in object {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(Error::invalid(format!(
                        "option {key:?} must be a string, not {}",
                        kind_of(other)
                    )))
                }
            };
            map.insert(key.clone(), text);
        }
        Ok(Options { map })
    }

    /// What kubelet sends the driver for a FlexVolume PV named `pv_name` whose
    /// `flexVolume.options` are `self`: kubelet's own keys (the PV name, `flexVolume.fsType`,
    /// `readOnly`) with the PV's options merged over them, as kubelet merges them (last: they may
    /// override anything).
    pub fn with_kubelet_keys(&self, pv_name: &str, fs_type: &str, read_only: bool) -> Options {
        let mut sent = self.clone();
        for (key, value) in [
            (PV_OR_VOLUME_NAME, pv_name),
            (FS_TYPE, fs_type),
            (READ_WRITE, if read_only { "ro" } else { "rw" }),
        ] {
            sent.map
                .entry(key.to_owned())
                .or_insert_with(|| value.to_owned());
        }
        sent
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// A value, with "" treated as absent (kubelet always sends `kubernetes.io/fsType`, often "").
    fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    /// Which key names the volume: `volumeID`, else `kubernetes.io/pvOrVolumeName` (the one
    /// rule; empty values count as absent). `None` when neither is set.
    pub fn volume_id_key(&self) -> Option<&'static str> {
        [VOLUME_ID, PV_OR_VOLUME_NAME]
            .into_iter()
            .find(|k| self.non_empty(k).is_some())
    }

    /// The volume, named by [`Options::volume_id_key`]; validated as a volume ID.
    pub fn volume_id(&self) -> Result<String, Error> {
        let id = self
            .volume_id_key()
            .and_then(|k| self.non_empty(k))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "no volume named: set the {VOLUME_ID:?} option (or kubelet's {PV_OR_VOLUME_NAME:?})"
                ))
            })?;
        validate::check_id("volume ID", id)?;
        Ok(id.to_owned())
    }

    /// `size` as bytes, when given.
    pub fn size(&self) -> Result<Option<u64>, Error> {
        Ok(self
            .non_empty(SIZE)
            .map(validate::parse_quantity)
            .transpose()?)
    }

    /// `kubernetes.io/fsType`; `None` when empty or absent (the volume's own type, else ext4).
    pub fn fs_type(&self) -> Result<Option<FsType>, Error> {
        Ok(self.non_empty(FS_TYPE).map(str::parse).transpose()?)
    }

    /// `mountOptions`, comma-separated.
    pub fn mount_options(&self) -> Result<Vec<String>, Error> {
        Ok(match self.non_empty(MOUNT_OPTIONS) {
            Some(s) => validate::parse_mount_options(s)?,
            None => Vec::new(),
        })
    }

    /// `kubernetes.io/readwrite`: "ro" is read-only; "rw" or absent read-write.
    pub fn read_only(&self) -> Result<bool, Error> {
        match self.non_empty(READ_WRITE) {
            None | Some("rw") => Ok(false),
            Some("ro") => Ok(true),
            Some(other) => Err(Error::invalid(format!(
                "option {READ_WRITE:?} must be \"rw\" or \"ro\", not {other:?}"
            ))),
        }
    }

    /// The pod's fsGroup (`kubernetes.io/mounterArgs.FsGroup`, or the pre-1.15 key).
    pub fn fs_group(&self) -> Result<Option<u32>, Error> {
        let Some((key, value)) = [FS_GROUP, FS_GROUP_OLD]
            .into_iter()
            .find_map(|k| self.non_empty(k).map(|v| (k, v)))
        else {
            return Ok(None);
        };
        loopvol::validate::parse_group_id("group ID", value)
            .map(Some)
            .map_err(|e| Error::invalid(format!("option {key:?}: {e}")))
    }

    /// The PV (or inline volume) name kubelet gives; FlexVolume's `detach` names only this.
    pub fn pv_name(&self) -> Option<&str> {
        self.non_empty(PV_OR_VOLUME_NAME)
    }

    /// A view for logs with every secret value replaced.
    pub fn redacted(&self) -> Redacted<'_> {
        Redacted(self)
    }
}

/// Whether an argument may be shown (logged, or echoed in a reply) as it is: a path, a node or
/// volume name, a device, a size. Anything else (the JSON options, option text, a leading BOM or
/// whitespace, quotes, `=`, `,`, control characters, more than 4096 bytes) may carry secrets and
/// is shown only by its length ([`shown_arg`]).
pub fn is_plain(arg: &str) -> bool {
    arg.len() <= 4096
        && arg.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | ':' | '~' | '+' | '@')
        })
}

/// An argument as logs and replies show it: as it is when [`is_plain`], else its length only.
pub fn shown_arg(arg: &str) -> String {
    if is_plain(arg) {
        format!("{arg:?}")
    } else {
        format!("<{} bytes, not shown>", arg.len())
    }
}

/// Whether a key's value must never be logged: kubelet's secrets, and anything in the user's
/// options whose name says it is one.
pub fn is_secret(key: &str) -> bool {
    if key.starts_with(SECRET_PREFIX) {
        return true;
    }
    let lower = key.to_ascii_lowercase();
    ["secret", "password", "passwd", "token", "credential"]
        .iter()
        .any(|w| lower.contains(w))
}

/// Options for logging: secrets show as `<redacted>`.
pub struct Redacted<'a>(&'a Options);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (k, v) in &self.0.map {
            if is_secret(k) {
                map.entry(k, &"<redacted>");
            } else {
                map.entry(k, v);
            }
        }
        map.finish()
    }
}

/// Never print the options by accident: Debug is redacted too.
impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Options{}", self.redacted())
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a call that mounts or attaches a volume needs, all validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub id: String,
    pub size: Option<u64>,
    pub fs_type: Option<FsType>,
    pub mount_options: Vec<String>,
    pub read_only: bool,
    pub fs_group: Option<u32>,
    pub pv_name: Option<String>,
}

impl VolumeRequest {
    pub fn from_options(o: &Options) -> Result<VolumeRequest, Error> {
        Ok(VolumeRequest {
            id: o.volume_id()?,
            size: o.size()?,
            fs_type: o.fs_type()?,
            mount_options: o.mount_options()?,
            read_only: o.read_only()?,
            fs_group: o.fs_group()?,
            pv_name: o.pv_name().map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn kubelet_options() {
        let o = Options::parse(
            r#"{"kubernetes.io/fsType":"","kubernetes.io/readwrite":"ro",
                "kubernetes.io/pvOrVolumeName":"pv-1","kubernetes.io/pod.name":"p",
                "kubernetes.io/mounterArgs.FsGroup":"2000","kubernetes.io/secret/password":"c2VjcmV0",
                "size":"1Gi","mountOptions":"noatime, discard"}"#,
        )
        .unwrap();
        let r = VolumeRequest::from_options(&o).unwrap();
        assert_eq!(r.id, "pv-1");
        assert_eq!(r.size, Some(1 << 30));
        assert_eq!(r.fs_type, None);
        assert_eq!(r.mount_options, ["noatime", "discard"]);
        assert!(r.read_only);
        assert_eq!(r.fs_group, Some(2000));
        assert_eq!(r.pv_name.as_deref(), Some("pv-1"));

        let o = Options::parse(
            r#"{"volumeID":"vol-9","kubernetes.io/pvOrVolumeName":"pv-1","kubernetes.io/fsType":"xfs",
                "kubernetes.io/fsGroup":"7","size":1073741824}"#,
        )
        .unwrap();
        let r = VolumeRequest::from_options(&o).unwrap();
        assert_eq!(r.id, "vol-9");
        assert_eq!(r.fs_type, Some(FsType::Xfs));
        assert_eq!(r.fs_group, Some(7));
        assert_eq!(r.size, Some(1 << 30));
        assert!(!r.read_only);
    }

    #[test]
    fn bad_json_and_values() {
        let err = message(Options::parse("{nope").unwrap_err());
        assert!(err.contains("not valid JSON"), "{err}");
        for (json, kind) in [("[1]", "an array"), ("\"s\"", "a string"), ("null", "null")] {
            let err = message(Options::parse(json).unwrap_err());
            assert!(
                err.contains("must be a JSON object") && err.contains(kind),
                "{err}"
            );
        }
        let err = message(Options::parse(r#"{"size":{"a":1}}"#).unwrap_err());
        assert!(err.contains("\"size\" must be a string"), "{err}");

        let req = |json: &str| VolumeRequest::from_options(&Options::parse(json).unwrap());
        let err = message(req("{}").unwrap_err());
        assert!(err.contains("no volume named"), "{err}");
        for bad in ["..", "a/b", "../../etc", ".x"] {
            let err = message(req(&format!(r#"{{"volumeID":{bad:?}}}"#)).unwrap_err());
            assert!(err.contains("invalid volume ID"), "{bad}: {err}");
        }
        let err = message(req(r#"{"volumeID":"v","size":"lots"}"#).unwrap_err());
        assert!(err.contains("invalid size"), "{err}");
        let err = message(req(r#"{"volumeID":"v","kubernetes.io/fsType":"ntfs"}"#).unwrap_err());
        assert!(err.contains("\"ntfs\" is not supported"), "{err}");
        let err = message(req(r#"{"volumeID":"v","kubernetes.io/readwrite":"RO"}"#).unwrap_err());
        assert!(err.contains("\"rw\" or \"ro\""), "{err}");
        let err = message(
            req(r#"{"volumeID":"v","kubernetes.io/mounterArgs.FsGroup":"-1"}"#).unwrap_err(),
        );
        assert!(err.contains("group ID"), "{err}");
        let err = message(req(r#"{"volumeID":"v","mountOptions":"bind"}"#).unwrap_err());
        assert!(err.contains("mount option"), "{err}");
    }

    #[test]
    fn one_volume_id_rule_for_kubelet_and_migration() {
        let pv_options = |json: &str| match serde_json::from_str(json).unwrap() {
            Value::Object(m) => Options::from_map(&m).unwrap(),
            other => panic!("{other}"),
        };
        // volumeID wins; else kubelet's PV name; empty values count as absent.
        for (options, want, key) in [
            (r#"{"volumeID":"vol-1"}"#, "vol-1", VOLUME_ID),
            (r#"{}"#, "pv-a", PV_OR_VOLUME_NAME),
            (r#"{"volumeID":""}"#, "pv-a", PV_OR_VOLUME_NAME),
            // The PV's options override kubelet's keys, as kubelet merges them last.
            (
                r#"{"kubernetes.io/pvOrVolumeName":"other"}"#,
                "other",
                PV_OR_VOLUME_NAME,
            ),
        ] {
            let sent = pv_options(options).with_kubelet_keys("pv-a", "xfs", true);
            assert_eq!(sent.volume_id().unwrap(), want, "{options}");
            assert_eq!(sent.volume_id_key(), Some(key), "{options}");
            assert!(sent.read_only().unwrap());
        }
        let sent =
            pv_options(r#"{"kubernetes.io/fsType":"btrfs"}"#).with_kubelet_keys("p", "xfs", false);
        assert_eq!(sent.fs_type().unwrap(), Some(FsType::Btrfs));
        assert!(!sent.read_only().unwrap());
        let sent =
            pv_options(r#"{"kubernetes.io/pvOrVolumeName":""}"#).with_kubelet_keys("p", "", false);
        assert_eq!(sent.volume_id_key(), None);
        assert!(message(sent.volume_id().unwrap_err()).contains("no volume named"));
        let options = pv_options(r#"{"size":"1Gi","volumeID":"v"}"#);
        assert_eq!(options.keys().collect::<Vec<_>>(), ["size", "volumeID"]);
    }

    #[test]
    fn only_plain_arguments_are_shown() {
        // (argument, shown as it is)
        let table = [
            ("/var/lib/kubelet/pods/u/volumes/loopvol~loopvol/pv-1", true),
            ("node-a.example.com", true),
            ("loopvol:pv-1", true),
            ("1073741824", true),
            ("", true),
            (r#"{"kubernetes.io/secret/password":"aHVudGVy"}"#, false),
            ("\u{feff}{\"mountOptions\":\"password=hunter2\"}", false),
            ("  {\"a\":1}", false),
            ("password=hunter2", false),
            ("noatime,password=x", false),
            ("a\nb", false),
            ("/path with space", false),
        ];
        for (arg, plain) in table {
            assert_eq!(is_plain(arg), plain, "{arg:?}");
            let shown = shown_arg(arg);
            assert_eq!(!shown.contains("not shown"), plain, "{arg:?}: {shown}");
            if !plain {
                assert!(
                    !shown.contains("hunter") && !shown.contains("aHVudGVy"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let o = Options::parse(
            r#"{"kubernetes.io/secret/key":"c3VwZXJzZWNyZXQ=","apiToken":"tok-123","volumeID":"v"}"#,
        )
        .unwrap();
        for shown in [o.redacted().to_string(), format!("{o:?}")] {
            assert!(!shown.contains("c3VwZXJzZWNyZXQ="), "{shown}");
            assert!(!shown.contains("tok-123"), "{shown}");
            assert!(
                shown.contains("<redacted>") && shown.contains("\"v\""),
                "{shown}"
            );
        }
        assert!(is_secret("kubernetes.io/secret/anything"));
        assert!(!is_secret("kubernetes.io/pod.name"));
    }
}
