//! Block-style YAML for a `serde_json::Value` that YAML 1.1 readers read the same as YAML 1.2
//! readers.
//!
//! Why not the YAML crate's own emitter: it writes YAML 1.2 and leaves `yes`, `on`, `y`, `no`,
//! `off` or `1_000` unquoted, which kubectl (go-yaml, YAML 1.1) reads as booleans and numbers.
//! A live PV carries `pv.kubernetes.io/bound-by-controller: "yes"`; written as `yes`, kubectl
//! would refuse the manifest (an annotation must be a string). Here a string is written plain
//! only when it is unambiguous in both versions; anything else is a double-quoted JSON string
//! (JSON's escapes are valid in YAML double quotes).

use serde_json::Value;

/// One YAML document (no `---`), ending in a newline.
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => map(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => seq(&mut out, a, 0),
        scalar => {
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

fn map(out: &mut String, m: &serde_json::Map<String, Value>, indent: usize) {
    for (i, (k, v)) in m.iter().enumerate() {
        // The first key of a map that is a list item goes on the item's "- " line.
        if i > 0 || out.ends_with('\n') || out.is_empty() {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&string(k));
        out.push(':');
        value(out, v, indent, false);
    }
}

fn seq(out: &mut String, a: &[Value], indent: usize) {
    for (i, v) in a.iter().enumerate() {
        if i > 0 || out.ends_with('\n') || out.is_empty() {
            out.push_str(&" ".repeat(indent));
        }
        out.push('-');
        value(out, v, indent, true);
    }
}

/// The value after `key:` or `-`. Maps nest two spaces deeper; a list under a key stays at the
/// key's indentation (kubectl's style); items of an item go on its line.
fn value(out: &mut String, v: &Value, indent: usize, in_seq: bool) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            if in_seq {
                out.push(' ');
            } else {
                out.push('\n');
            }
            map(out, m, indent + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            if in_seq {
                out.push(' ');
                seq(out, a, indent + 2);
            } else {
                out.push('\n');
                seq(out, a, indent);
            }
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
}

fn inline(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// Plain when safe in YAML 1.1 and 1.2, else a JSON string.
fn string(s: &str) -> String {
    if plain_is_safe(s) {
        s.to_owned()
    } else {
        serde_json::to_string(s).expect("a string serializes")
    }
}

/// Only letters, digits and `-._/`, no boolean or null word of either YAML version, and starting
/// with a letter or '/', or with a digit when a letter other than an exponent's follows and
/// nothing of a hex, octal or binary prefix or a 1.1 digit separator appears (so `1Gi` is plain;
/// `1e3`, `0x1F`, `0o7`, `0b1`, `1_000` and `2026-01-01` are quoted). Without ':' or
/// spaces nothing is a timestamp or sexagesimal; `.inf`, indicators and "" are quoted.
fn plain_is_safe(s: &str) -> bool {
    const WORDS: &[&str] = &["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    let Some(first) = s.chars().next() else {
        return false;
    };
    let chars_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'));
    let start_ok = first.is_ascii_alphabetic()
        || first == '/'
        || (first.is_ascii_digit()
            && !s.contains(|c: char| "_xXoObB".contains(c))
            && s.chars()
                .any(|c| c.is_ascii_alphabetic() && !"eE".contains(c)));
    chars_ok && start_ok && !WORDS.contains(&s.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layout() {
        let v = json!({
            "a": {"b": [1, "x", {"c": true, "d": null}], "e": {}},
            "f": [],
            "g": [[1, 2], {"h": {"i": "j"}}],
            "k": "v",
        });
        assert_eq!(
            to_string(&v),
            "a:\n  b:\n  - 1\n  - x\n  - c: true\n    d: null\n  e: {}\nf: []\ng:\n- - 1\n  - 2\n- h:\n    i: j\nk: v\n"
        );
        assert_eq!(to_string(&json!("s")), "s\n");
    }

    #[test]
    #[rustfmt::skip]
    fn ambiguous_strings_are_quoted() {
        let quoted = [
            "yes", "Yes", "ON", "off", "y", "N", "true", "null", "", "1", "1e3", "1E", "0b1", "0o7",
            "1_000", "1_0Gi", "1:20", "0x1F", "2026-01-01", ".inf", "~", "-a", "a b", "a: b", "a#b",
            "*x", "&x", "!x", "@x", "'", "\"", "line\nbreak", "é",
        ];
        for s in quoted {
            let out = string(s);
            assert!(out.starts_with('"'), "{s:?} -> {out}");
            let back: Value = serde_yaml_ng::from_str(&out).unwrap();
            assert_eq!(back, json!(s), "{out}");
        }
        let plain = [
            "v1", "csi.loopvol.io", "topology.loopvol.io/node", "ReadWriteOnce", "/a/b", "a_b",
            "1Gi", "500Mi", "10G", "1.5Ti", "4k",
        ];
        for s in plain {
            assert_eq!(string(s), s);
            let back: Value = serde_yaml_ng::from_str(s).unwrap();
            assert_eq!(back, json!(s));
        }
    }

    #[test]
    fn reads_back_the_same() {
        let v = json!({
            "metadata": {"name": "p", "annotations": {"pv.kubernetes.io/bound-by-controller": "yes",
                          "note": "two\nlines: and \"quotes\" \\ \t tab"}},
            "spec": {"capacity": {"storage": "1Gi"}, "n": 3, "f": 1.5, "list": [[], {}, [[]]]},
        });
        let back: Value = serde_yaml_ng::from_str(&to_string(&v)).unwrap();
        assert_eq!(back, v);
    }
}
