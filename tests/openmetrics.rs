//! A strict parser of the OpenMetrics text format (what `/metrics` and `loopvol metrics` write),
//! for tests that compare the exposed values with what they did: every line must be valid,
//! every sample must belong to the family declared before it with a suffix its type allows,
//! units must be part of the name, histograms must be cumulative with `+Inf` equal to `_count`,
//! and the text must end with `# EOF`. And [`scrape`]: an HTTP GET of `/metrics`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;

/// One metric family: its declaration and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's full name (`x_total`, `x_bucket`, ...).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Exposition {
    pub families: Vec<Family>,
}

impl Exposition {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The samples named `sample` whose labels include every pair of `labels`.
    pub fn samples<'a>(&'a self, sample: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == sample)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample named `sample` with `labels` among its labels; panics when there is none
    /// or more than one.
    #[track_caller]
    pub fn value(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.samples(sample, labels);
        assert!(
            found.len() == 1,
            "{} samples {sample}{labels:?} (want 1): {found:?}",
            found.len()
        );
        found[0].value
    }

    /// The sum of every sample named `sample` with `labels` among its labels (0 when none).
    pub fn sum(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(sample, labels).iter().map(|s| s.value).sum()
    }
}

fn is_metric_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The suffixes a sample of a family of `kind` may have.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "gauge" | "unknown" | "stateset" => &[""],
        "info" => &["_info"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        _ => &[],
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v
            .parse::<f64>()
            .map_err(|_| format!("{v:?} is not a number")),
    }
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("a label without '='")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("{name:?} is not a label name"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("a bad escape {other:?} in a label value")),
                },
                Some((_, '\n')) => return Err("a newline in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by ','".into());
        }
    }
}

/// Parses an OpenMetrics text exposition, refusing anything the format does not allow.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or("the exposition does not end with # EOF")?;
    let mut out = Exposition::default();
    for (n, line) in body.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let rest = parts.next();
            if !is_metric_name(name) {
                return Err(at(format!("{name:?} is not a metric name")));
            }
            if !matches!(keyword, "TYPE" | "HELP" | "UNIT") {
                return Err(at(format!("unknown keyword {keyword}")));
            }
            // Metadata lines come before a family's samples, in any order: a name other than
            // the current family's starts a new family (which must not have been seen before).
            if out
                .families
                .last()
                .is_none_or(|f| f.name != name || !f.samples.is_empty())
            {
                if out.family(name).is_some() {
                    return Err(at(format!("family {name} declared twice")));
                }
                out.families.push(Family {
                    name: name.to_owned(),
                    kind: String::new(),
                    help: None,
                    unit: None,
                    samples: Vec::new(),
                });
            }
            let f = out.families.last_mut().expect("pushed above");
            let text = rest.unwrap_or("").to_owned();
            match keyword {
                "TYPE" if f.kind.is_empty() => {
                    if suffixes(&text).is_empty() {
                        return Err(at(format!("unknown type {text}")));
                    }
                    f.kind = text;
                }
                "HELP" if f.help.is_none() => f.help = Some(text),
                "UNIT" if f.unit.is_none() => {
                    if text.is_empty() || !name.ends_with(&format!("_{text}")) {
                        return Err(at(format!("unit {text:?} is not the name's suffix")));
                    }
                    f.unit = Some(text);
                }
                _ => return Err(at(format!("{keyword} given twice"))),
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("not a sample, and not a # TYPE/HELP/UNIT line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).map_err(|e| at(format!("timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields (exemplars are not expected)".into()));
        }
        let family = out
            .families
            .last_mut()
            .filter(|f| !f.kind.is_empty())
            .ok_or_else(|| at("a sample before its family's TYPE".into()))?;
        let suffix = name
            .strip_prefix(family.name.as_str())
            .filter(|s| suffixes(&family.kind).contains(s))
            .ok_or_else(|| {
                at(format!(
                    "{name} is not a sample of {} {}",
                    family.kind, family.name
                ))
            })?;
        if suffix == "_bucket" && !labels.contains_key("le") {
            return Err(at("a bucket without le".into()));
        }
        family.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    for f in &out.families {
        if f.kind == "histogram" {
            check_histogram(f)?;
        }
    }
    Ok(out)
}

/// Buckets cumulative, `+Inf` present and equal to `_count`, per label set.
fn check_histogram(f: &Family) -> Result<(), String> {
    /// A series' labels but `le`.
    type Key = Vec<(String, String)>;
    let mut series: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<Key, f64> = BTreeMap::new();
    for s in &f.samples {
        let mut key: Key = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        key.sort();
        if s.name.ends_with("_bucket") {
            let le = parse_value(&s.labels["le"])?;
            series.entry(key).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(key, s.value);
        }
    }
    for (key, buckets) in &series {
        let what = format!("{}{key:?}", f.name);
        if !buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            return Err(format!("{what}: buckets not cumulative: {buckets:?}"));
        }
        let inf = buckets.last().filter(|b| b.0.is_infinite());
        let count = counts.get(key);
        if inf.map(|b| b.1) != count.copied() {
            return Err(format!("{what}: +Inf bucket {inf:?} != _count {count:?}"));
        }
    }
    Ok(())
}

/// `GET /metrics` from `addr`: (status, content type, body).
pub fn scrape(addr: SocketAddr) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "# HELP a_seconds A.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\n\
a_seconds_sum{m=\"x\"} 1.5\na_seconds_count{m=\"x\"} 2\na_seconds_bucket{m=\"x\",le=\"0.1\"} 1\n\
a_seconds_bucket{m=\"x\",le=\"+Inf\"} 2\n# TYPE c counter\nc_total{k=\"a\\\"b\"} 3\n# EOF\n";

    #[test]
    fn parses_and_finds_values() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.value("a_seconds_count", &[("m", "x")]), 2.0);
        assert_eq!(e.value("c_total", &[("k", "a\"b")]), 3.0);
        assert_eq!(e.sum("c_total", &[]), 3.0);
        assert_eq!(
            e.family("a_seconds").unwrap().unit.as_deref(),
            Some("seconds")
        );
    }

    #[test]
    fn refuses_what_the_format_does_not_allow() {
        let bad = [
            GOOD.trim_end_matches("# EOF\n").to_owned(),
            GOOD.replace("c_total", "c_count"),
            GOOD.replace("# UNIT a_seconds seconds", "# UNIT a_seconds bytes"),
            GOOD.replace("le=\"+Inf\"} 2", "le=\"+Inf\"} 3"),
            GOOD.replace("le=\"0.1\"} 1", "le=\"0.1\"} 5"),
            GOOD.replace("k=\"a\\\"b\"", "k=a"),
            GOOD.replace("# TYPE c counter\n", ""),
            GOOD.replace("c_total{k=\"a\\\"b\"} 3", "c_total{k=\"a\"} x"),
            GOOD.replace("# TYPE c counter", "# TYPE c countr"),
            format!("{GOOD}c_total 1\n"),
            GOOD.replace("c_total{k=\"a\\\"b\"} 3", "c_total{k=\"a\",k=\"b\"} 3"),
        ];
        for text in bad {
            assert!(parse(&text).is_err(), "accepted:\n{text}");
        }
    }
}
