//! The benchmark keeps working: `bench/run --smoke` drives loadgen -> otlp-relay -> sink for a
//! few seconds with the binary under test and fails unless every accepted span reached the sink.
mod support;

use std::process::Command;

#[test]
fn bench_smoke_delivers_everything_through_the_relay() {
    let out = Command::new("python3")
        .arg(support::repo_root().join("bench/run"))
        .args(["--smoke", "--bin"])
        .arg(support::bin())
        .env("NO_COLOR", "1")
        .output()
        .expect("python3 runs bench/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench/run --smoke failed:\n{stdout}\n{stderr}");
    // The table has the relay row with a non-zero rate and zero loss.
    let row = stdout
        .lines()
        .find(|l| l.contains("otlp-relay"))
        .unwrap_or_else(|| panic!("no relay row in:\n{stdout}\n{stderr}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let rate: f64 = cells[3].replace(',', "").parse().unwrap();
    assert!(rate > 1000.0, "{row}");
    assert!(cells[4].ends_with("/ 0"), "{row}");
}
