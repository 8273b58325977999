//! 30 seconds of the chaos harness (`src/chaos/`) on each backend: real
//! coordinators and workers killed, frozen, cut off and slowed (and on
//! PostgreSQL the server restarted) while migrations of every shape run;
//! faults of several kinds were injected, every migration ended as its
//! plan implies, and nothing broke a rule.

use std::time::Duration;

use stagecoach_tests::chaos::{self, Options};
use stagecoach_tests::{Backend, on_both_backends};

on_both_backends!(thirty_seconds_of_chaos);

async fn thirty_seconds_of_chaos(backend: Backend) {
    let report = chaos::run(Options::smoke(backend, Duration::from_secs(30)))
        .await
        .expect("the chaos harness starts");
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    let kinds = report.fault_counts();
    assert!(kinds.len() >= 3, "faults of too few kinds: {report}");
    assert!(report.migration_count >= 30, "too few migrations: {report}");
    let shapes: std::collections::BTreeSet<_> =
        report.migrations.keys().map(|(shape, _)| *shape).collect();
    assert!(shapes.len() >= 5, "too few plan shapes ran: {report}");
}
