//! The README's "Operating loopvol" section against the real server: its alerting rules parse
//! as Prometheus rule YAML, and every metric and label they name is in what `loopvol-csi
//! --metrics-address` serves (a rule naming a metric that does not exist never fires). No root.

use std::collections::BTreeSet;
use std::path::Path;

use loopvol_e2e::openmetrics;
use loopvol_e2e::{binary, CsiServer, Scratch};
use serde::Deserialize;
use serde_json::Value;

/// The YAML block under the README's "### Alerting rules".
fn alerting_rules() -> Value {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = readme
        .split_once("### Alerting rules")
        .expect("the README has an Alerting rules section")
        .1;
    let block = section
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("a ```yaml block under Alerting rules")
        .0;
    Value::deserialize(serde_yaml_ng::Deserializer::from_str(block))
        .unwrap_or_else(|e| panic!("the alerting rules are not YAML: {e}\n{block}"))
}

/// Words of `text` that look like identifiers.
fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readmes_alerting_rules_name_what_the_server_exports() {
    let rules = alerting_rules();
    let groups = rules["groups"].as_array().expect("groups");
    let rules: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["LoopvolPoolNearlyFullyPromised", "LoopvolVolumeAbnormal"]
    );

    // A server on a fresh pool, metrics on a free port.
    let s = Scratch::new();
    let server = CsiServer::start(
        binary("loopvol-csi"),
        &s,
        "csi",
        &[
            format!("--pool={}", s.pool().display()),
            "--node-id=node-a".into(),
            "--metrics-address=127.0.0.1:0".into(),
        ],
    );
    let addr = server.metrics_address();
    let (status, _, body) = openmetrics::scrape(addr);
    assert_eq!(status, 200);
    let exposition = openmetrics::parse(&body).unwrap();

    let mut wrong = Vec::new();
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().expect("expr");
        let duration = rule["for"].as_str().expect("for");
        if !(duration.ends_with('m') || duration.ends_with('s'))
            || duration[..duration.len() - 1].parse::<u32>().is_err()
        {
            wrong.push(format!("{name}: for {duration:?}"));
        }
        if rule["labels"]["severity"].as_str().is_none()
            || rule["annotations"]["summary"].as_str().is_none()
        {
            wrong.push(format!(
                "{name}: needs labels.severity and annotations.summary"
            ));
        }
        if expr.matches('(').count() != expr.matches(')').count() {
            wrong.push(format!("{name}: unbalanced parentheses"));
        }
        // Every metric it names exists, and every label it groups by or shows is on it.
        let metrics: Vec<String> = words(expr)
            .into_iter()
            .filter(|w| w.starts_with("loopvol_"))
            .collect();
        assert!(!metrics.is_empty(), "{name} names no loopvol metric");
        let mut labels: BTreeSet<String> = ["instance", "job"].map(String::from).into();
        for m in &metrics {
            let samples = exposition.samples(m, &[]);
            if samples.is_empty() {
                wrong.push(format!("{name}: {m} is not exported"));
            }
            labels.extend(samples.iter().flat_map(|s| s.labels.keys().cloned()));
        }
        let mut used: BTreeSet<String> = BTreeSet::new();
        if let Some((_, by)) = expr.split_once("by (") {
            used.extend(words(by.split(')').next().unwrap()));
        }
        for text in rule["annotations"].as_object().unwrap().values() {
            for part in text.as_str().unwrap().split("$labels.").skip(1) {
                let label = part
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default();
                used.insert(label.to_owned());
            }
        }
        for l in used.difference(&labels) {
            wrong.push(format!("{name}: label {l} is not on {metrics:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
