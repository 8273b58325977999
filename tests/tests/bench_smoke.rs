//! The bench command in `--quick` mode on SQLite, as a library call: every
//! figure is measured, finite and positive (0 allowed for one process's CPU
//! time per task, counted in 10 ms ticks over a run of a few hundred tasks),
//! and the JSON report is written. Never a speed threshold:
//! CI machines are shared and slow, and the numbers are for people.

use clap::Parser;
use stagecoach_tests::bench::{self, Options};

#[tokio::test(flavor = "multi_thread")]
async fn quick_bench_measures_every_figure_and_writes_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("results.json");
    let opts = Options::parse_from([
        "bench",
        "--quick",
        "--backend",
        "sqlite",
        "--runs",
        "1",
        "--out",
        out.to_str().expect("utf-8 temp path"),
        // Smaller than --quick's 2,000 tasks and 50 stages: a debug
        // coordinator runs a few hundred tasks a second, and this test
        // checks the harness, not the speed, in about 15 s.
        "--tasks",
        "300",
        "--stages",
        "20",
        "--creates",
        "10",
    ]);
    let (report, written) = bench::run(opts).await.expect("the bench runs");
    assert_eq!(written, out);

    assert!(!report.figures.is_empty());
    for f in &report.figures {
        assert!(f.errors.is_empty(), "{} failed: {:?}", f.key, f.errors);
        assert!(
            f.unavailable.is_none(),
            "{} not available: {:?}",
            f.key,
            f.unavailable
        );
        assert_eq!(f.runs.len(), 1, "{}: {:?}", f.key, f.runs);
        let may_be_zero = f.unit == "us/task" && f.key != "sqlite.cpu_machine";
        for &v in &f.runs {
            let ok = v.is_finite() && (v > 0.0 || (may_be_zero && v == 0.0));
            assert!(ok, "{} measured {v} {}", f.key, f.unit);
        }
    }
    for key in [
        "echo",
        "sqlite.sqlx_tx",
        "sqlite.sqlx_tx_p99",
        "sqlite.throughput",
        "sqlite.throughput_create",
        "sqlite.cpu_machine",
        "sqlite.cpu_coordinator",
        "sqlite.cpu_workers",
        "sqlite.stage_transition_p99",
        "sqlite.start_latency_p99",
        "sqlite.fanout_peak_rss",
        "sqlite.streams_rss",
        "sqlite.queued_admission",
    ] {
        assert!(report.figure(key).is_some(), "no figure {key}");
    }

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("JSON written"))
            .expect("valid JSON");
    assert_eq!(
        json["figures"].as_array().map(Vec::len),
        Some(report.figures.len())
    );
    assert!(json["machine"]["nproc"].as_u64().is_some_and(|n| n > 0));
    assert!(json["git"]["commit"].is_string());
    assert!(json["date"].is_string());
    for (figure, baseline) in [
        ("sqlite.throughput", "echo"),
        ("sqlite.stage_transition_p99", "sqlite.sqlx_tx_p99"),
    ] {
        let ratio = &json["summary"][figure]["ratios"][baseline];
        assert!(
            ratio.as_f64().is_some_and(|r| r.is_finite() && r > 0.0),
            "{figure} / {baseline}: {ratio}"
        );
    }
}
