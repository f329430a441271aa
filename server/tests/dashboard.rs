//! The Helm chart's Grafana dashboard (helm/shoal/dashboards/shoal.json)
//! against the real `shoal` binary: every PromQL query names metrics the
//! server exports, with the right type for its suffix (`_bucket` of a
//! histogram, never a histogram's bare name) and only labels those series
//! carry.

mod common;

use common::{ffnn_input, Server};
use regex::Regex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// The GPU metrics' source: without a GPU the server publishes only
/// `shoal_gpus 0`, so the per-GPU gauges cannot appear in a scrape here.
const GPU_SOURCE: &str = include_str!("../src/gpu.rs");

/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// What a scrape exposes: `# TYPE` lines, and each sample's name with the
/// label names seen on it.
#[derive(Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    series: BTreeMap<String, BTreeSet<String>>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let label = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)=""#).unwrap();
        let mut s = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    s.types.insert(name.into(), kind.into());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                let labels = s.series.entry(line[..end].to_string()).or_default();
                if let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) {
                    labels.extend(
                        label
                            .captures_iter(&line[open..close])
                            .map(|c| c[1].to_string()),
                    );
                }
            }
        }
        s
    }

    /// Whether `name`, as a query uses it, selects series of this scrape.
    fn check(&self, name: &str) -> Result<(), String> {
        if self.series.contains_key(name) {
            return Ok(());
        }
        match self.types.get(name).map(String::as_str) {
            // A histogram's series are its _bucket, _sum and _count only.
            Some("histogram") => {
                return Err(format!(
                    "{name} is a histogram: query {name}_bucket, _sum or _count"
                ))
            }
            Some(_) => return Ok(()),
            None => {}
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                return match self.types.get(base).map(String::as_str) {
                    Some("histogram") => Ok(()),
                    Some("summary") if suffix != "_bucket" => Ok(()),
                    Some(kind) => Err(format!("{base} is a {kind}: it has no {name}")),
                    None => Err(format!("neither {name} nor {base} is exported")),
                };
            }
        }
        Err(format!("{name} is not exported"))
    }

    /// Label names on the series `name` selects (a histogram's from its buckets).
    fn labels(&self, name: &str) -> BTreeSet<String> {
        [
            name.to_string(),
            format!("{name}_bucket"),
            format!("{name}_count"),
        ]
        .iter()
        .filter_map(|n| self.series.get(n))
        .flatten()
        .cloned()
        .collect()
    }
}

/// Every PromQL string in the dashboard: the panels' `expr`, and the
/// variables' `definition` / `query` (where they name a metric).
fn queries(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                let here = format!("{path}.{k}");
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push((here, s.clone())),
                    ("definition" | "query", Value::String(s)) if s.contains("shoal_") => {
                        out.push((here, s.clone()))
                    }
                    _ => queries(x, &here, out),
                }
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                queries(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The metric identifiers of a query (`shoal_*`, string literals left out,
/// so a label value cannot pass for a metric).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let strings = Regex::new(r#""(?:[^"\\]|\\.)*""#).unwrap();
    let ident = Regex::new(r"[a-zA-Z_:][a-zA-Z0-9_:]*").unwrap();
    let bare = strings.replace_all(expr, "\"\"");
    ident
        .find_iter(&bare)
        .map(|m| m.as_str())
        .filter(|n| n.starts_with("shoal_"))
        .map(String::from)
        .collect()
}

/// The label names a query groups by or matches on.
fn label_names(expr: &str) -> BTreeSet<String> {
    let grouping = Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let selector = Regex::new(r"\{([^}]*)\}").unwrap();
    let matcher = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*""#).unwrap();
    let mut out = BTreeSet::new();
    for c in grouping.captures_iter(expr) {
        out.extend(
            c[1].split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    for c in selector.captures_iter(expr) {
        out.extend(matcher.captures_iter(&c[1]).map(|m| m[1].to_string()));
    }
    out
}

/// The per-GPU gauges gpu.rs publishes (`gauge!("shoal_gpu_…", &labels)`)
/// and the label names of its `labels` array.
fn gpu_source() -> (BTreeSet<String>, BTreeSet<String>) {
    let gauges = Regex::new(r#"gauge!\(\s*"(shoal_gpu_[a-z0-9_]+)"\s*,\s*&labels"#).unwrap();
    let names: BTreeSet<String> = gauges
        .captures_iter(GPU_SOURCE)
        .map(|c| c[1].to_string())
        .collect();
    let labels_line = Regex::new(r"let labels = \[([^\]]*)\]").unwrap();
    let label = Regex::new(r#"\(\s*"([a-z_]+)""#).unwrap();
    let labels: BTreeSet<String> = labels_line
        .captures(GPU_SOURCE)
        .map(|c| {
            label
                .captures_iter(&c[1])
                .map(|l| l[1].to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !names.is_empty() && !labels.is_empty(),
        "server/src/gpu.rs no longer publishes its per-GPU gauges as \
         gauge!(\"shoal_gpu_…\", &labels) with `let labels = [...]`: update this test"
    );
    (names, labels)
}

#[tokio::test]
async fn every_dashboard_query_names_metrics_shoal_exports() {
    // An objective makes the adaptive batcher (and its per-replica gauges)
    // exist; a generous one sheds nothing on a loaded machine.
    let repo = common::ffnn_repo_with_config("max_batch_size = 64\nlatency_objective_ms = 10000\n");
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();
    let url = format!("{}/v2/models/ffnn/infer", s.http);
    for i in 0..5 {
        let body = json!({"inputs": [{"name": "input", "shape": [2, 784], "datatype": "FP32",
            "data": ffnn_input(2, i)}]});
        let r = c.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // A failure, so shoal_request_failure_total has a series.
    let bad = json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
        "data": [1, 2, 3]}]});
    assert_eq!(c.post(&url).json(&bad).send().await.unwrap().status(), 400);
    let text = common::get_text(&c, format!("{}/metrics", s.metrics)).await;
    assert_eq!(s.stop(), Some(0));
    let scrape = Scrape::parse(&text);

    let path = common::repo_root().join("helm/shoal/dashboards/shoal.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut found = Vec::new();
    queries(&dashboard, "", &mut found);
    assert!(
        found.iter().filter(|(w, _)| w.ends_with(".expr")).count() >= 10,
        "too few expr in {}: {found:?}",
        path.display()
    );

    let gpus: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("shoal_gpus "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shoal_gpus in\n{text}"));
    let (gpu_gauges, gpu_labels) = gpu_source();

    let mut errors = Vec::new();
    for (at, expr) in &found {
        let names = metric_names(expr);
        if at.ends_with(".expr") && names.is_empty() {
            errors.push(format!("{at}: names no shoal_ metric: {expr}"));
        }
        let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for name in &names {
            match scrape.check(name) {
                Ok(()) => {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .filter(|b| scrape.types.contains_key(*b))
                        .unwrap_or(name.as_str());
                    labels.extend(scrape.labels(base));
                    labels.extend(scrape.labels(name));
                }
                // Without a GPU the per-GPU gauges have no series, so only
                // for them, and only when the scrape shows no GPU, the name
                // is checked against what server/src/gpu.rs publishes (there
                // is no public list of the names to use instead). With a
                // GPU the scrape must hold them like any other metric.
                Err(_) if gpus == 0.0 && gpu_gauges.contains(name) => {
                    labels.extend(gpu_labels.iter().cloned());
                }
                Err(e) => errors.push(format!("{at}: {e}: {expr}")),
            }
        }
        for l in label_names(expr) {
            if !labels.contains(&l) {
                errors.push(format!(
                    "{at}: label {l} is on none of {names:?} (has {labels:?}): {expr}"
                ));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} query problems in {}:\n{}\n\nscrape:\n{text}",
        errors.len(),
        path.display(),
        errors.join("\n")
    );
}

#[test]
fn metric_and_label_names_are_read_as_promql_has_them() {
    let expr = r#"histogram_quantile(0.99, sum by (model, le) (rate(shoal_request_duration_seconds_bucket{model=~"$model",reason="shoal_not_a_metric"}[$__rate_interval])))"#;
    assert_eq!(
        metric_names(expr).into_iter().collect::<Vec<_>>(),
        ["shoal_request_duration_seconds_bucket"]
    );
    assert_eq!(
        label_names(expr).into_iter().collect::<Vec<_>>(),
        ["le", "model", "reason"]
    );
    let scrape = Scrape::parse(
        "# TYPE shoal_x_seconds histogram\n\
         shoal_x_seconds_bucket{model=\"m\",le=\"0.1\"} 1\n\
         shoal_x_seconds_sum{model=\"m\"} 0.1\n\
         shoal_x_seconds_count{model=\"m\"} 1\n\
         # TYPE shoal_y gauge\n\
         shoal_y{model=\"m\",replica=\"0\"} 3\n",
    );
    assert!(scrape.check("shoal_x_seconds_bucket").is_ok());
    assert!(scrape.check("shoal_x_seconds_count").is_ok());
    assert!(scrape.check("shoal_x_seconds").is_err(), "bare histogram");
    assert!(scrape.check("shoal_y").is_ok());
    assert!(
        scrape.check("shoal_y_bucket").is_err(),
        "a gauge has no buckets"
    );
    assert!(scrape.check("shoal_yy").is_err(), "misspelt");
    assert!(scrape.labels("shoal_x_seconds").contains("le"));
    assert!(scrape.labels("shoal_y").contains("replica"));
}
