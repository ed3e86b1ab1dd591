//! Typed identifiers, validated once where they enter (a request field, an argv, a metadata file)
//! and trusted everywhere after. Every backend operation takes these, never a bare string, so an
//! unchecked `../../x` cannot reach a path.
//!
//! Deserializing validates too: an ID read from `volume.json` that breaks the rule is corrupt
//! metadata, not a path to follow.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::validate;

/// The conversions every typed name shares, given its `parse(field, value)` and the field name
/// its errors use by default.
macro_rules! string_type {
    ($name:ident, $what:literal) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(value: String) -> Result<Self> {
                Self::parse($what, value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(value: &str) -> Result<Self> {
                Self::parse($what, value)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self> {
                Self::parse($what, value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let value = String::deserialize(d)?;
                Self::parse($what, value).map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $name_what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `id`, naming the offending field `field` in the error.
            pub fn parse(field: &'static str, id: impl Into<String>) -> Result<Self> {
                let id = id.into();
                validate::check_id(field, &id)?;
                Ok($name(id))
            }

            /// The ID a caller's name (CSI's idempotency key) maps to: the name itself when it
            /// is a valid ID (so operators find `pvc-…` in the pool), else a stable hash of it.
            /// Deterministic, so creation by name needs no name index.
            pub fn for_name(name: &str) -> Result<Self> {
                validate::check_name($name_what, name)?;
                Ok($name(id_for_name(name)))
            }
        }

        string_type!($name, $what);
    };
}

id_type!(
    /// A volume's ID: the name of its directory under `volumes/` (one plain path component).
    VolumeId,
    "volume ID",
    "volume name"
);
id_type!(
    /// A snapshot's ID: the name of its directory under `snapshots/`.
    SnapshotId,
    "snapshot ID",
    "snapshot name"
);
id_type!(
    /// A group snapshot's ID: recorded in each member's metadata (a group has no directory).
    GroupSnapshotId,
    "group snapshot ID",
    "group snapshot name"
);

fn id_for_name(name: &str) -> String {
    if validate::check_id("name", name).is_ok() {
        return name.to_owned();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("h-{hex}")
}

/// Longest node name (CSI's limit on node IDs; Kubernetes node names are at most 253 bytes).
pub const MAX_NODE_LEN: usize = 256;

/// A node's name: the CSI node ID, the Kubernetes node name FlexVolume is given, or the configured
/// name of this node. One rule for every front end: not empty, at most 256 bytes, no control
/// characters. It is recorded in metadata and never used as a path component as is: a node's
/// directories in the pool (`staging/<node>`, `nodes/<node>`) use [`NodeName::path_component`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

impl NodeName {
    /// Validates `node`, naming the offending field `field` in the error.
    pub fn parse(field: &'static str, node: impl Into<String>) -> Result<Self> {
        let node = node.into();
        validate::check_length(field, &node, MAX_NODE_LEN)?;
        if let Some(c) = node.chars().find(|c| c.is_control()) {
            return Err(Error::invalid(
                field,
                format!("contains the control character {c:?}"),
            ));
        }
        Ok(NodeName(node))
    }

    /// The node's name as one safe path component: itself when it is a valid ID, else a hash
    /// (`/` and `..` are legal in a CSI node ID).
    pub fn path_component(&self) -> String {
        id_for_name(&self.0)
    }
}

string_type!(NodeName, "node name");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn volume_ids() {
        // (input, accepted)
        let table: &[(&str, bool)] = &[
            ("pvc-0a1b2c3d-4e5f", true),
            ("a", true),
            ("a.b_c-d", true),
            (&"a".repeat(128), true),
            (&"a".repeat(129), false),
            ("", false),
            ("..", false),
            (".", false),
            (".hidden", false),
            ("a/b", false),
            ("../x", false),
            ("a\0b", false),
            ("a b", false),
            ("é", false),
        ];
        let mut wrong = Vec::new();
        for (input, accepted) in table {
            let got = VolumeId::try_from(*input);
            if got.is_ok() != *accepted {
                wrong.push(format!("{input:?}: {got:?}"));
            }
            if let Err(e) = got {
                assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                assert!(e.to_string().starts_with("invalid volume ID"), "{e}");
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        let err = SnapshotId::parse("source snapshot ID", "a/b").unwrap_err();
        assert!(err.to_string().starts_with("invalid source snapshot ID"));
    }

    #[test]
    fn names_map_to_ids() {
        // (name, expected ID or None for a hash, accepted)
        let table: &[(&str, Option<&str>, bool)] = &[
            ("pvc-123", Some("pvc-123"), true),
            ("ns/claim with spaces", None, true),
            ("..", None, true),
            (&"é".repeat(64), None, true),
            (&"é".repeat(65), None, false),
            ("a\0b", None, false),
            ("", None, false),
        ];
        let mut wrong = Vec::new();
        for (name, want, accepted) in table {
            match (VolumeId::for_name(name), accepted) {
                (Ok(id), true) => {
                    let ok = match want {
                        Some(w) => id.as_str() == *w,
                        None => id.as_str().starts_with("h-") && id.as_str().len() == 42,
                    };
                    if !ok {
                        wrong.push(format!("{name:?} → {id}"));
                    }
                    // Always a valid ID, and stable.
                    VolumeId::try_from(id.as_str()).unwrap();
                    assert_eq!(VolumeId::for_name(name).unwrap(), id);
                }
                (Err(_), false) => {}
                (got, _) => wrong.push(format!("{name:?}: {got:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        assert_ne!(
            VolumeId::for_name("ns/a b").unwrap(),
            VolumeId::for_name("ns/a b2").unwrap()
        );
    }

    #[test]
    fn node_names() {
        let table: &[(&str, bool)] = &[
            ("node-a", true),
            ("worker-1.example.com", true),
            ("../../etc", true), // legal; its path component is a hash
            ("a/b:c", true),
            (&"n".repeat(256), true),
            (&"n".repeat(257), false),
            ("", false),
            ("a\0b", false),
            ("a\nb", false),
            ("tab\there", false),
            ("del\u{7f}", false),
        ];
        let rows = table.iter().map(|&(input, accepted)| (input, accepted));
        crate::table::check(rows, |input| NodeName::try_from(*input).is_ok());
        let odd = NodeName::try_from("../../etc").unwrap();
        let component = odd.path_component();
        assert!(component.starts_with("h-"), "{component}");
        VolumeId::try_from(component.as_str()).unwrap();
        assert_eq!(
            NodeName::try_from("node-a").unwrap().path_component(),
            "node-a"
        );
    }

    #[test]
    fn deserializing_validates() {
        #[derive(Debug, Deserialize)]
        struct Record {
            #[allow(dead_code)]
            id: VolumeId,
            #[allow(dead_code)]
            node: Option<NodeName>,
        }
        // (JSON, accepted)
        let table = [
            (r#"{"id": "pvc-1", "node": "n1"}"#, true),
            (r#"{"id": "pvc-1", "node": null}"#, true),
            (r#"{"id": "../../x", "node": null}"#, false),
            (r#"{"id": "", "node": null}"#, false),
            (r#"{"id": ".hidden", "node": null}"#, false),
            (r#"{"id": "v", "node": ""}"#, false),
            (r#"{"id": "v", "node": "a\u0000b"}"#, false),
        ];
        crate::table::check(table, |json| serde_json::from_str::<Record>(json).is_ok());
        let err = serde_json::from_str::<Record>(r#"{"id": "../../x", "node": null}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid volume ID"), "{err}");
        let id = VolumeId::try_from("v-1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"v-1\"");
    }
}
