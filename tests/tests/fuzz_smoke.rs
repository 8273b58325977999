//! A few seconds of the fuzzer (`src/fuzz/`) on each backend: the
//! coordinator survives generated hostile input, answers none of it with
//! `INTERNAL` or `UNKNOWN` (but for the named known findings), stays
//! SERVING with bounded memory, and every migration passes the checker.

use std::time::Duration;

use stagecoach_tests::fuzz::{self, Options};
use stagecoach_tests::{Backend, on_both_backends};

on_both_backends!(hostile_input_for_a_few_seconds);

async fn hostile_input_for_a_few_seconds(backend: Backend) {
    let report = fuzz::run(Options::smoke(backend, Duration::from_secs(5)))
        .await
        .expect("the fuzzer starts");
    println!("{report}");
    assert!(report.requests > 20, "too few requests: {report}");
    assert!(report.migrations_checked > 0, "no migration ran: {report}");
    assert!(report.violations.is_empty(), "{report}");
}
