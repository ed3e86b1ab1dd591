//! The README's "Operating loopvol" section against the real server: its alerting rules parse
//! as Prometheus rule YAML, every metric and label they name is in what `loopvol-csi
//! --metrics-address` serves (a rule naming a metric that does not exist never fires), and the
//! pool rule, evaluated on what the server serves, is quiet on an empty pool and fires once
//! nearly everything the pool can promise is promised. No root.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use loopvol::{CreateVolume, NodeName, Pool, PoolOptions};
use loopvol_e2e::openmetrics::{self, Exposition};
use loopvol_e2e::{binary, poll_until, CsiServer, Scratch};
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
    let server = metrics_server(&s);
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

/// The value of a PromQL expression of the few forms the README's pool rule uses (numbers,
/// metric names, `+ - * /`, parentheses, a comparison that filters, `max|min|sum by (...)`)
/// over an exposition holding one pool: each metric name is its one sample. `None`: the
/// comparison filtered the sample out (the rule does not fire).
fn evaluate(expr: &str, m: &Exposition) -> Option<f64> {
    let tokens = tokenize(expr);
    let mut at = 0;
    let value = comparison(&tokens, &mut at, m);
    assert_eq!(at, tokens.len(), "unparsed: {:?}", &tokens[at..]);
    value
}

fn tokenize(expr: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            let mut word = String::new();
            while let Some(&c) = chars
                .peek()
                .filter(|c| c.is_ascii_alphanumeric() || **c == '_' || **c == '.')
            {
                word.push(c);
                chars.next();
            }
            tokens.push(word);
        } else if "<>=!".contains(c) {
            let mut op = String::from(c);
            chars.next();
            if chars.peek() == Some(&'=') {
                op.push('=');
                chars.next();
            }
            tokens.push(op);
        } else {
            tokens.push(c.to_string());
            chars.next();
        }
    }
    tokens
}

fn comparison(t: &[String], at: &mut usize, m: &Exposition) -> Option<f64> {
    let left = sum(t, at, m);
    let Some(op) = t
        .get(*at)
        .filter(|o| ["<=", ">=", "<", ">", "==", "!="].contains(&o.as_str()))
    else {
        return left;
    };
    *at += 1;
    let right = sum(t, at, m);
    let (l, r) = (left?, right?);
    let keep = match op.as_str() {
        "<=" => l <= r,
        ">=" => l >= r,
        "<" => l < r,
        ">" => l > r,
        "==" => l == r,
        _ => l != r,
    };
    keep.then_some(l)
}

fn sum(t: &[String], at: &mut usize, m: &Exposition) -> Option<f64> {
    let mut value = product(t, at, m);
    while let Some(op) = t.get(*at).filter(|o| *o == "+" || *o == "-") {
        *at += 1;
        let right = product(t, at, m);
        value = match op.as_str() {
            "+" => Some(value? + right?),
            _ => Some(value? - right?),
        };
    }
    value
}

fn product(t: &[String], at: &mut usize, m: &Exposition) -> Option<f64> {
    let mut value = operand(t, at, m);
    while let Some(op) = t.get(*at).filter(|o| *o == "*" || *o == "/") {
        *at += 1;
        let right = operand(t, at, m);
        value = match op.as_str() {
            "*" => Some(value? * right?),
            _ => Some(value? / right?),
        };
    }
    value
}

fn operand(t: &[String], at: &mut usize, m: &Exposition) -> Option<f64> {
    let token = t[*at].clone();
    *at += 1;
    let expect = |want: &str, at: &mut usize| {
        assert_eq!(t.get(*at).map(String::as_str), Some(want), "at token {at}");
        *at += 1;
    };
    if token == "(" {
        let value = comparison(t, at, m);
        expect(")", at);
        return value;
    }
    if ["max", "min", "sum"].contains(&token.as_str()) {
        expect("by", at);
        expect("(", at);
        while t[*at] != ")" {
            *at += 1;
        }
        expect(")", at);
        expect("(", at);
        let value = comparison(t, at, m);
        expect(")", at);
        return value;
    }
    if let Ok(n) = token.parse::<f64>() {
        return Some(n);
    }
    assert!(token.starts_with("loopvol_"), "unknown token {token:?}");
    Some(m.value(&token, &[]))
}

#[test]
fn the_pool_rule_fires_when_nearly_everything_is_promised() {
    let rules = alerting_rules();
    let expr = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "LoopvolPoolNearlyFullyPromised")
        .and_then(|r| r["expr"].as_str())
        .expect("the pool rule")
        .to_owned();
    let s = Scratch::new();
    let server = metrics_server(&s);
    let addr = server.metrics_address();
    let scrape_with = |volumes: f64| {
        let mut last = None;
        poll_until(Duration::from_secs(20), "the pool's gauges", || {
            let (status, _, body) = openmetrics::scrape(addr);
            assert_eq!(status, 200);
            let m = openmetrics::parse(&body).unwrap();
            let done = m.value("loopvol_volumes", &[("state", "created")]) == volumes;
            last = Some(m);
            done
        });
        last.unwrap()
    };
    let m = scrape_with(0.0);
    assert_eq!(evaluate(&expr, &m), None, "fired on an empty pool");

    // Nearly all the pool can promise (the filesystem under the scratch dir), promised to a
    // thin volume (sparse, it takes nothing), then reserved for a thick one whose filesystem
    // trimmed every block (a thick volume's image with nothing allocated, planted: reserving
    // that much for real would fill the machine's disk): the rule fires either way, its value
    // what is left.
    let pool = Pool::open(
        s.pool(),
        PoolOptions::new(NodeName::try_from("node-a").unwrap()),
    )
    .unwrap();
    for (round, thick) in [false, true].into_iter().enumerate() {
        let made = (0..5)
            .find_map(|_| {
                let can = pool.capacity().unwrap().available_bytes;
                pool.create_volume(&CreateVolume::blank(
                    format!("nearly-all-{round}"),
                    can / 100 * 97,
                ))
                .ok()
            })
            .expect("a volume of 97 % of what the pool can promise");
        let meta = s.pool().join(format!("volumes/{}/volume.json", made.id));
        if thick {
            let mut m: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
            m["allocation"] = "thick".into();
            std::fs::write(&meta, m.to_string()).unwrap();
        }
        let m = scrape_with(1.0);
        let (promised, reserved) = (
            m.value("loopvol_pool_thin_promised_bytes", &[]),
            m.value("loopvol_pool_thick_reserved_bytes", &[]),
        );
        let size = made.size_bytes as f64;
        let (mine, other) = if thick {
            (reserved, promised)
        } else {
            (promised, reserved)
        };
        assert!(
            mine >= size && other < size,
            "thick {thick}: promised {promised}, reserved {reserved}"
        );
        assert_eq!(
            evaluate(&expr, &m),
            Some(m.value("loopvol_pool_available_bytes", &[])),
            "thick {thick}: {expr}"
        );
        pool.delete_volume(&made.id).unwrap();
        scrape_with(0.0);
    }
}

#[test]
fn the_evaluator_reads_promql_as_prometheus_does() {
    let m = openmetrics::parse(
        "# TYPE loopvol_a gauge\nloopvol_a 10\n# TYPE loopvol_b gauge\nloopvol_b 90\n# EOF\n",
    )
    .unwrap();
    for (expr, want) in [
        ("loopvol_a + loopvol_b * 2", Some(190.0)),
        ("(loopvol_a + loopvol_b) / 4", Some(25.0)),
        ("loopvol_a <= 0.10 * (loopvol_a + loopvol_b)", Some(10.0)),
        ("loopvol_a < 0.10 * (loopvol_a + loopvol_b)", None),
        ("max by (pool) (loopvol_b - loopvol_a > 0)", Some(80.0)),
        ("loopvol_a > 11", None),
    ] {
        assert_eq!(evaluate(expr, &m), want, "{expr}");
    }
}

/// A CSI server for node-a on the scratch pool, its metrics on a free port.
fn metrics_server(s: &Scratch) -> CsiServer {
    CsiServer::start(
        binary("loopvol-csi"),
        s,
        "csi",
        &[
            format!("--pool={}", s.pool().display()),
            "--node-id=node-a".into(),
            "--metrics-address=127.0.0.1:0".into(),
        ],
    )
}
