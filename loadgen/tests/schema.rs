//! The checked-in JSON schema of `report.json` matches what a run writes:
//! every property the schema requires is there with the right JSON type, and
//! nothing is written that the schema does not describe. (A small checker
//! for the subset of JSON Schema the file uses.)

use serde_json::Value;
use shoal_loadgen::analyze::{burst_recovery, summarize};
use shoal_loadgen::pipeline::{run, Experiment, Load};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::scorer::Scorer;
use std::time::Duration;

fn check(schema: &Value, value: &Value, at: &str) {
    if let Some(options) = schema.get("enum") {
        assert!(
            options.as_array().unwrap().contains(value),
            "{at}: {value} not in {options}"
        );
        return;
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(|t| t.as_str()).collect(),
        _ => vec![],
    };
    let is = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "null" => value.is_null(),
        _ => false,
    };
    assert!(
        types.is_empty() || types.iter().any(|t| is(t)),
        "{at}: {value} is not {types:?}"
    );
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            assert!(obj.contains_key(r.as_str().unwrap()), "{at}: missing {r}");
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(s, v, &format!("{at}.{k}")),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => panic!("{at}: {k} is not in the schema"),
                    Some(s @ Value::Object(_)) => check(s, v, &format!("{at}.{k}")),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(items, v, &format!("{at}[{i}]"));
        }
    }
}

#[tokio::test]
async fn report_json_follows_its_schema() {
    let schema: Value = serde_json::from_str(include_str!("../schema/report.schema.json")).unwrap();
    let schedule = Schedule::Bursts {
        base: 200.0,
        burst: 600.0,
        burst_len: Duration::from_millis(500),
        period: Duration::from_secs(1),
    };
    let exp = Experiment {
        load: Load::Open(schedule.clone()),
        duration: Duration::from_secs(3),
        mp: 1,
        rows: 1,
        point_len: 4,
        keys: None,
        zipf: None,
        seed: 17,
        partition_capacity: 1 << 16,
        data: None,
    };
    let r = run(&exp, Scorer::synthetic(Duration::from_millis(2))).await;
    let s = summarize(&r, 0.25);
    let bursts = burst_recovery(&r, &schedule);
    assert!(!bursts.is_empty());
    // The same shape main.rs writes.
    let report = serde_json::json!({"summary": s, "bursts": bursts});
    check(&schema, &report, "report");
    // And the checker does reject what the schema forbids.
    let mut bad = report.clone();
    bad["summary"]["surprise"] = Value::from(1);
    assert!(std::panic::catch_unwind(|| check(&schema, &bad, "report")).is_err());
}
