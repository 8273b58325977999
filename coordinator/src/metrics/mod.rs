//! The counts this coordinator process keeps for `/metrics`: events it
//! committed or served, each counted by the process that saw it, so
//! several coordinators on one database are summed in PromQL
//! (`sum without (instance) (rate(stagecoach_task_retries_total[5m]))`).
//! What the database knows for all of them (migrations, pools, ready tasks,
//! leases) is read at scrape time instead: `http::metrics`, whose module
//! doc lists every family.
//!
//! One [`Metrics`] per [`Coordinator`](crate::engine::Coordinator), with a
//! registry of its own, not the `prometheus` crate's global one: the demo
//! and the tests run several coordinators in one process. The engine calls
//! it where it learns of an event — the committed [`Effects`] of a store
//! transition, a sweep's report, a batch of reports — with one call each;
//! what it adds per task is an atomic increment or a histogram observation,
//! plus the task timer's map entry ([`tasks`]).

mod rpc;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::domain::{LeaseToken, ReportAck, SweepReport};
use crate::error::{Error, Result};
use crate::store::Effects;

pub use rpc::{ObserveRpc, RpcMethods};
use tasks::TaskTimer;

/// Buckets of task attempts, in seconds: milliseconds to hours.
const TASK_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 14400.0,
];

/// Buckets of stages, in seconds: a fraction of a second to a day.
const STAGE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

/// Buckets of one group commit, in seconds.
const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets of reports per group commit, up to its cap (2048).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// This process's counters and histograms. Cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Families>,
}

struct Families {
    registry: Registry,
    lease_expiries: IntCounter,
    attempt_timeouts: IntCounter,
    deadlines_exceeded: IntCounter,
    retries: IntCounter,
    dead: IntCounter,
    reports: IntCounterVec,
    stage_seconds: Histogram,
    task_seconds: HistogramVec,
    rpc_seconds: HistogramVec,
    commit_seconds: Histogram,
    commit_reports: Histogram,
    tasks: TaskTimer,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family at zero, registered in a registry of its own.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid counter");
            registry.register(Box::new(c.clone())).expect("a new name");
            c
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels).expect("a valid histogram");
            registry.register(Box::new(h.clone())).expect("a new name");
            h
        };
        let reports = IntCounterVec::new(
            Opts::new(
                "stagecoach_reports_total",
                "Worker reports answered by this coordinator, by report (complete, fail) and outcome: recorded, duplicate (recorded before), stale (lease not held: rejected), invalid (over a limit: rejected), not_recorded (the database failed; the worker sends it again)",
            ),
            &["report", "outcome"],
        )
        .expect("a valid counter");
        registry
            .register(Box::new(reports.clone()))
            .expect("a new name");
        let families = Families {
            lease_expiries: counter(
                "stagecoach_lease_expiries_total",
                "Leases this coordinator's sweeper found expired (no heartbeat in time)",
            ),
            attempt_timeouts: counter(
                "stagecoach_attempt_timeouts_total",
                "Attempts this coordinator's sweeper ended at their start-to-close timeout",
            ),
            deadlines_exceeded: counter(
                "stagecoach_deadlines_exceeded_total",
                "Migrations this coordinator's sweeper failed past their deadline",
            ),
            retries: counter(
                "stagecoach_task_retries_total",
                "Failed attempts whose task runs again after its backoff, committed by this coordinator",
            ),
            dead: counter(
                "stagecoach_tasks_died_total",
                "Tasks that died (attempts used up, or a failure not retryable), committed by this coordinator",
            ),
            reports,
            stage_seconds: histogram(
                "stagecoach_stage_duration_seconds",
                "How long each stage that succeeded ran, start to last task (database clock), for stages whose success this coordinator committed",
                STAGE_BUCKETS,
                &[],
            )
            .with_label_values::<&str>(&[]),
            task_seconds: histogram(
                "stagecoach_task_duration_seconds",
                "Attempts this coordinator handed out and recorded, from sending the assignment to recording the report, by outcome (succeeded, failed)",
                TASK_BUCKETS,
                &["outcome"],
            ),
            rpc_seconds: histogram(
                "stagecoach_rpc_duration_seconds",
                "gRPC calls served, from the request to the end of the response, by service, method and status code (streams: their whole life)",
                prometheus::DEFAULT_BUCKETS,
                &["service", "method", "code"],
            ),
            commit_seconds: histogram(
                "stagecoach_report_commit_duration_seconds",
                "One group commit: a batch of worker reports and the dispatch pass it runs, in one transaction",
                COMMIT_BUCKETS,
                &[],
            )
            .with_label_values::<&str>(&[]),
            commit_reports: histogram(
                "stagecoach_report_commit_batch_size",
                "Worker reports recorded by one group commit",
                BATCH_BUCKETS,
                &[],
            )
            .with_label_values::<&str>(&[]),
            tasks: TaskTimer::default(),
            registry,
        };
        // Every known series at zero from the start: a rate over a series
        // that appears only with its first event misses that event.
        for report in ["complete", "fail"] {
            for outcome in OUTCOMES {
                families.reports.with_label_values(&[report, outcome]);
            }
        }
        for outcome in ["succeeded", "failed"] {
            families.task_seconds.with_label_values(&[outcome]);
        }
        Metrics {
            inner: Arc::new(families),
        }
    }

    /// The current value of every family of this process.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.inner.registry.gather()
    }

    /// Counts what a committed transition did, and forgets the timers of
    /// leases it ended without a report (called for other coordinators'
    /// effects too: those carry no counts).
    pub(crate) fn applied(&self, fx: &Effects) {
        let m = &self.inner;
        m.retries.inc_by(fx.counted.retries.into());
        m.dead.inc_by(fx.counted.dead.into());
        for ms in &fx.counted.stages_ms {
            m.stage_seconds.observe(*ms as f64 / 1000.0);
        }
        for r in &fx.revoked {
            m.tasks.forget(&r.worker_id, r.lease);
        }
        for worker in &fx.lost {
            m.tasks.forget_worker(worker);
        }
    }

    /// Counts what one sweep found.
    pub(crate) fn swept(&self, report: &SweepReport) {
        let m = &self.inner;
        m.lease_expiries.inc_by(report.leases_expired.into());
        m.attempt_timeouts.inc_by(report.attempts_timed_out.into());
        m.deadlines_exceeded
            .inc_by(report.deadlines_exceeded.into());
    }

    /// Starts the timers of leases just sent to `worker`.
    pub(crate) fn assigned(&self, worker: &str, leases: impl Iterator<Item = LeaseToken>) {
        self.inner.tasks.start(worker, leases);
    }

    /// Forgets the timer of a lease handed back before its worker got it.
    pub(crate) fn released(&self, worker: &str, lease: LeaseToken) {
        self.inner.tasks.forget(worker, lease);
    }

    /// Counts a batch of one worker's reports (`report`: "complete" or
    /// "fail") by outcome, and observes the attempts they recorded.
    pub(crate) fn reported(
        &self,
        report: &'static str,
        worker: &str,
        leases: impl Iterator<Item = LeaseToken>,
        results: &[Result<ReportAck>],
    ) {
        let m = &self.inner;
        let ended: Vec<(LeaseToken, bool)> = leases
            .zip(results)
            .filter_map(|(lease, r)| {
                let outcome = outcome(r);
                m.reports.with_label_values(&[report, outcome]).inc();
                // A report that did not end the lease leaves its timer.
                let ends = matches!(outcome, "recorded" | "duplicate" | "stale");
                ends.then_some((lease, outcome == "recorded"))
            })
            .collect();
        let task_outcome = if report == "complete" {
            "succeeded"
        } else {
            "failed"
        };
        let histogram = m.task_seconds.with_label_values(&[task_outcome]);
        m.tasks.stop(worker, ended.into_iter(), |took| {
            histogram.observe(took.as_secs_f64())
        });
    }

    /// Observes one group commit of `reports` reports that took `took`.
    pub(crate) fn committed(&self, reports: usize, took: Duration) {
        self.inner.commit_seconds.observe(took.as_secs_f64());
        self.inner.commit_reports.observe(reports as f64);
    }

    /// The histogram of one RPC's duration.
    fn rpc(&self, service: &str, method: &str, code: &str) -> Histogram {
        self.inner
            .rpc_seconds
            .with_label_values(&[service, method, code])
    }
}

/// Every `outcome` of a report.
const OUTCOMES: [&str; 5] = ["recorded", "duplicate", "stale", "invalid", "not_recorded"];

/// The `outcome` label of one report's result.
fn outcome(result: &Result<ReportAck>) -> &'static str {
    match result {
        Ok(ReportAck::Recorded) => "recorded",
        Ok(ReportAck::Duplicate) => "duplicate",
        Err(Error::LeaseNotHeld(_) | Error::FailedPrecondition(_)) => "stale",
        Err(Error::InvalidArgument { .. } | Error::ResourceExhausted(_)) => "invalid",
        Err(_) => "not_recorded",
    }
}
