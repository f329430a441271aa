//! Triton's metric names (`nv_inference_*`, `nv_gpu_*`) for the series
//! shoal and Triton both have, derived at scrape time from shoal's own
//! exposition when `--metrics-triton-names` is on, so Grafana dashboards and
//! alerts built for Triton read shoal unchanged. Deriving them from the
//! rendered text costs the request path nothing.

/// One Triton series and where it comes from.
struct Derived {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    /// The shoal series (with its `_sum` suffix for histograms).
    from: &'static str,
    scale: f64,
    /// Labels summed away (Triton has no such label).
    drop: &'static [&'static str],
}

const DERIVED: &[Derived] = &[
    Derived {
        name: "nv_inference_request_success",
        kind: "counter",
        help: "Number of successful inference requests, all batch sizes",
        from: "shoal_request_success_total",
        scale: 1.0,
        drop: &[],
    },
    Derived {
        name: "nv_inference_request_failure",
        kind: "counter",
        help: "Number of failed inference requests, all batch sizes",
        from: "shoal_request_failure_total",
        scale: 1.0,
        drop: &["reason"],
    },
    Derived {
        name: "nv_inference_count",
        kind: "counter",
        help: "Number of inferences performed (a batch of n counts n)",
        from: "shoal_inference_count_total",
        scale: 1.0,
        drop: &[],
    },
    Derived {
        name: "nv_inference_exec_count",
        kind: "counter",
        help: "Number of model executions performed (a batch counts once)",
        from: "shoal_execution_count_total",
        scale: 1.0,
        drop: &[],
    },
    Derived {
        name: "nv_inference_request_duration_us",
        kind: "counter",
        help: "Cumulative inference request duration in microseconds",
        from: "shoal_request_duration_seconds_sum",
        scale: 1e6,
        drop: &[],
    },
    Derived {
        name: "nv_inference_queue_duration_us",
        kind: "counter",
        help: "Cumulative inference queuing duration in microseconds",
        from: "shoal_queue_duration_seconds_sum",
        scale: 1e6,
        drop: &[],
    },
    Derived {
        name: "nv_inference_compute_infer_duration_us",
        kind: "counter",
        help: "Cumulative compute inference duration in microseconds",
        from: "shoal_compute_duration_seconds_sum",
        scale: 1e6,
        drop: &[],
    },
    Derived {
        name: "nv_inference_pending_request_count",
        kind: "gauge",
        help: "Instantaneous number of pending requests awaiting execution",
        from: "shoal_queue_depth",
        scale: 1.0,
        drop: &[],
    },
    Derived {
        name: "nv_gpu_utilization",
        kind: "gauge",
        help: "GPU utilization rate [0.0 - 1.0)",
        from: "shoal_gpu_utilization_percent",
        scale: 0.01,
        drop: &[],
    },
    Derived {
        name: "nv_gpu_memory_total_bytes",
        kind: "gauge",
        help: "GPU total memory, in bytes",
        from: "shoal_gpu_memory_total_bytes",
        scale: 1.0,
        drop: &[],
    },
    Derived {
        name: "nv_gpu_memory_used_bytes",
        kind: "gauge",
        help: "GPU used memory, in bytes",
        from: "shoal_gpu_memory_used_bytes",
        scale: 1.0,
        drop: &[],
    },
];

/// One sample line of an exposition.
struct Sample<'a> {
    name: &'a str,
    /// As written: values still escaped, so they are re-emitted unchanged.
    labels: Vec<(&'a str, &'a str)>,
    value: f64,
}

fn sample(line: &str) -> Option<Sample<'_>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        // Label values are quoted with backslash escapes; find the closing
        // brace outside quotes.
        let (mut in_quote, mut escaped, mut close) = (false, false, None);
        for (i, c) in body.char_indices() {
            match (in_quote, escaped, c) {
                (true, true, _) => escaped = false,
                (true, false, '\\') => escaped = true,
                (_, false, '"') => in_quote = !in_quote,
                (false, _, '}') => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let close = close?;
        let mut inner = &body[..close];
        while !inner.is_empty() {
            let eq = inner.find('=')?;
            let key = inner[..eq].trim().trim_start_matches(',').trim();
            let after = inner[eq + 1..].strip_prefix('"')?;
            let mut end = None;
            let mut esc = false;
            for (i, c) in after.char_indices() {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, '\\') => esc = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end?;
            labels.push((key, &after[..end]));
            inner = after[end + 1..].trim_start_matches(',');
        }
        rest = &body[close + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The Triton-named series derived from `exposition` (shoal's rendered
/// metrics), in Prometheus text format.
pub fn derive(exposition: &str) -> String {
    let samples: Vec<_> = exposition.lines().filter_map(sample).collect();
    let mut out = String::new();
    for d in DERIVED {
        // Summed by the labels Triton keeps, in first-seen order.
        let mut series: Vec<(String, f64)> = Vec::new();
        for s in samples.iter().filter(|s| s.name == d.from) {
            let (labels, v) = (&s.labels, s.value);
            let key = labels
                .iter()
                .filter(|(k, _)| !d.drop.contains(k))
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect::<Vec<_>>()
                .join(",");
            match series.iter_mut().find(|(k, _)| *k == key) {
                Some((_, sum)) => *sum += v * d.scale,
                None => series.push((key, v * d.scale)),
            }
        }
        if series.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "# HELP {} {}\n# TYPE {} {}\n",
            d.name, d.help, d.name, d.kind
        ));
        for (labels, v) in series {
            let v = if d.kind == "counter" { v.round() } else { v };
            if labels.is_empty() {
                out.push_str(&format!("{} {v}\n", d.name));
            } else {
                out.push_str(&format!("{}{{{labels}}} {v}\n", d.name));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOAL: &str = r#"# HELP shoal_request_success_total Inference requests answered successfully
# TYPE shoal_request_success_total counter
shoal_request_success_total{model="ffnn",version="2"} 7
shoal_request_success_total{model="a \"quoted}\" name",version="1"} 1
# TYPE shoal_request_failure_total counter
shoal_request_failure_total{model="ffnn",version="2",reason="overloaded"} 2
shoal_request_failure_total{model="ffnn",version="2",reason="invalid_argument"} 3
# TYPE shoal_request_duration_seconds histogram
shoal_request_duration_seconds_bucket{model="ffnn",version="2",le="0.001"} 5
shoal_request_duration_seconds_sum{model="ffnn",version="2"} 0.0125
shoal_request_duration_seconds_count{model="ffnn",version="2"} 7
# TYPE shoal_queue_depth gauge
shoal_queue_depth{model="ffnn",version="2"} 4
# TYPE shoal_gpus gauge
shoal_gpus 0
"#;

    #[test]
    fn triton_series_come_from_shoals_with_tritons_units_and_labels() {
        let d = derive(SHOAL);
        assert!(d.contains("nv_inference_request_success{model=\"ffnn\",version=\"2\"} 7\n"));
        assert!(d.contains(
            "nv_inference_request_success{model=\"a \\\"quoted}\\\" name\",version=\"1\"} 1\n"
        ));
        // Summed over shoal's reason label.
        assert!(d.contains("nv_inference_request_failure{model=\"ffnn\",version=\"2\"} 5\n"));
        // Seconds to microseconds.
        assert!(
            d.contains("nv_inference_request_duration_us{model=\"ffnn\",version=\"2\"} 12500\n")
        );
        assert!(d.contains("nv_inference_pending_request_count{model=\"ffnn\",version=\"2\"} 4\n"));
        assert!(d.contains("# TYPE nv_inference_request_success counter\n"));
        // No GPU series without GPUs.
        assert!(!d.contains("nv_gpu"));
        assert!(!d.contains("shoal_"));
    }

    #[test]
    fn odd_lines_are_skipped_not_misread() {
        assert!(sample("# TYPE x counter").is_none());
        assert!(sample("broken{model=\"x\" 1").is_none());
        assert!(sample("x{a=\"1\"} notanumber").is_none());
        assert_eq!(sample("plain 2.5").map(|s| s.value), Some(2.5));
    }
}
