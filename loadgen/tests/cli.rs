//! The `shoal-loadgen` binary as a person runs it: `run` with bursts and an
//! output folder, and `compare`, both writing their reports and plots.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository");
    assert!(
        p.join("ffnn/1/model.onnx").exists(),
        "run scripts/setup.sh to generate the models"
    );
    p
}

fn loadgen(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-loadgen"))
        .args(args)
        .arg("--model-repository")
        .arg(repo())
        .output()
        .expect("run shoal-loadgen");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn run_writes_report_csv_and_plots_and_reports_bursts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, text) = loadgen(&[
        "run",
        "--mode",
        "embedded",
        "--rate",
        "300",
        "--bursts",
        "900,0.5,1.5",
        "--duration",
        "3",
        "--out",
        out,
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("reconciliation: produced"), "{text}");
    assert!(text.contains("burst 1.0-1.5 s"), "{text}");
    for f in [
        "report.json",
        "latencies.csv",
        "latency.svg",
        "latency.png",
        "throughput.svg",
        "cdf.png",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing: {text}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["summary"]["reconciled"], true);
    let csv = std::fs::read_to_string(dir.path().join("latencies.csv")).unwrap();
    assert_eq!(
        csv.lines().count() as u64,
        1 + report["summary"]["produced"].as_u64().unwrap()
    );
}

#[test]
fn compare_prints_table_four_and_writes_each_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, text) = loadgen(&[
        "compare",
        "--modes",
        "embedded",
        "--mp",
        "1",
        "--probe-seconds",
        "1",
        "--out",
        out,
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("| embedded | 1 |"), "{text}");
    let rows: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("compare.json")).unwrap()).unwrap();
    assert!(
        rows[0]["sustainable_rate"].as_f64().unwrap() > 100.0,
        "{rows}"
    );
    for f in ["report.json", "latency.svg", "throughput.png"] {
        assert!(
            dir.path().join("embedded-mp1").join(f).is_file(),
            "{f} missing: {text}"
        );
    }
}
