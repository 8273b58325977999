//! The checks after the faults stopped: the cluster settles (bounded), then
//! every migration is judged by its event log and by the outcome its plan
//! implies, the merged log by the capacity rules, and ListWorkers by the
//! leases it still shows. Every failed check is a violation in the report,
//! with the events that show it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use stagecoach_proto::v1::{Event, EventKind, Migration};
use tokio::time::Instant;

use super::cluster::MAX_REASSIGNMENTS;
use super::report::Report;
use super::workload::Tracked;
use crate::backend::Backend;
use crate::capacity::{check_capacity, check_worker_slots};
use crate::checker::{check_attempt_bound, check_invariants, describe_event};
use crate::client::{Client, is_terminal};

/// Events of one migration shown with a violation, at most.
const LOG_LINES: usize = 300;

/// Waits until every migration is finished, at most `timeout`; returns how
/// long it took.
pub async fn settle(clients: &[Client], timeout: Duration) -> Duration {
    let began = Instant::now();
    while began.elapsed() < timeout {
        if let Some(all) = read_migrations(clients).await
            && all.iter().all(|m| is_terminal(m.state()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    began.elapsed()
}

/// Every check; violations and counts go into `report`.
pub async fn verify(
    clients: &[Client],
    backend: Backend,
    tracked: &[Tracked],
    pool_slots: usize,
    worker_slots: usize,
    report: &mut Report,
) {
    let Some(migrations) = read_migrations(clients).await else {
        report
            .violations
            .push("no coordinator answers ListMigrations after the run".into());
        return;
    };
    let by_id: HashMap<i64, &Tracked> = tracked.iter().map(|t| (t.id, t)).collect();
    let mut all_events = Vec::new();
    for listed in &migrations {
        // The migration as of after its log was read: one that was still
        // moving when listed must not be judged against a newer log.
        let Some((m, events)) = read_consistent(clients, listed.id).await else {
            report.violations.push(format!(
                "migration {}: no coordinator answers GetMigration and ListEvents",
                listed.id
            ));
            continue;
        };
        let m = &m;
        let t = by_id.get(&m.id).copied();
        let shape = t.map_or("untracked", |t| t.shape.name());
        *report.migrations.entry((shape, state_name(m))).or_default() += 1;
        let mut errors = Vec::new();
        if !is_terminal(m.state()) {
            errors.push(format!(
                "not finished after the settling time: {:?}",
                m.state()
            ));
        }
        if let Err(e) = check_invariants(m, &events) {
            errors.extend(e);
        }
        if let Some(t) = t {
            if !t.expect.accepts(m) {
                errors.push(format!(
                    "ended {} ({:?}), its plan implies {:?}",
                    state_name(m),
                    m.reason,
                    t.expect
                ));
            }
            if let Err(e) = check_attempt_bound(&events, t.max_attempts + MAX_REASSIGNMENTS) {
                errors.extend(e);
            }
        }
        if !errors.is_empty() {
            let n = t.map_or(String::new(), |t| format!(" n={}", t.n));
            report.violations.push(format!(
                "migration {} ({shape}{n}): {}\n  log:\n    {}",
                m.id,
                errors.join("\n  "),
                show(&events)
            ));
        }
        all_events.extend(events);
    }
    report.migration_count = migrations.len();
    count(&all_events, report);
    match check_capacity(&all_events, pool_slots, backend.commit_order()) {
        Ok(seen) => report.max_running = seen.max_running,
        Err(e) => report.violations.extend(e),
    }
    match check_worker_slots(&all_events, |_| worker_slots) {
        Ok(most) => report.max_worker_leases = most,
        Err(e) => report.violations.extend(e),
    }
    if let Err(v) = no_live_lease(clients).await {
        report.violations.push(v);
    }
}

/// Counts tasks, events by kind and reassignments.
fn count(events: &[Event], report: &mut Report) {
    let mut tasks = HashSet::new();
    let mut assigned = 0;
    for e in events {
        *report
            .events
            .entry(
                e.kind()
                    .as_str_name()
                    .trim_start_matches("EVENT_KIND_")
                    .to_string(),
            )
            .or_default() += 1;
        if e.task_id != 0 {
            tasks.insert(e.task_id);
        }
        if e.kind() == EventKind::TaskAssigned {
            assigned += 1;
        }
    }
    report.tasks = tasks.len();
    report.reassignments = assigned - tasks.len().min(assigned);
}

/// ListWorkers of every coordinator shows no lease once everything is
/// finished (polled for a while: a lease ends when its worker's report
/// or the sweeper gets to it).
async fn no_live_lease(clients: &[Client]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut live = BTreeMap::new();
        let mut unanswered = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(5), c.list_workers()).await {
                Ok(Ok(workers)) => {
                    for w in workers.into_iter().filter(|w| !w.leases.is_empty()) {
                        let leases: Vec<String> = w
                            .leases
                            .iter()
                            .map(|l| format!("task {} attempt {}", l.task_id, l.attempt))
                            .collect();
                        live.insert(format!("coordinator {i} worker {}", w.worker_id), leases);
                    }
                }
                other => unanswered.push(format!("coordinator {i}: {other:?}")),
            }
        }
        if live.is_empty() && unanswered.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "leases still live after every migration finished: {live:?}; ListWorkers unanswered: {unanswered:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn read_migrations(clients: &[Client]) -> Option<Vec<Migration>> {
    for c in clients {
        if let Ok(Ok(all)) =
            tokio::time::timeout(Duration::from_secs(10), c.list_migrations()).await
        {
            return Some(all);
        }
    }
    None
}

/// A migration and its log, read until the migration's state is the same
/// before and after the log (three tries).
async fn read_consistent(clients: &[Client], id: i64) -> Option<(Migration, Vec<Event>)> {
    let quick = Duration::from_secs(10);
    let mut last = None;
    for _ in 0..3 {
        for c in clients {
            let before = tokio::time::timeout(quick, c.get_migration(id)).await;
            let events = tokio::time::timeout(quick, c.events(id)).await;
            let after = tokio::time::timeout(quick, c.get_migration(id)).await;
            if let (Ok(Ok(before)), Ok(Ok(events)), Ok(Ok(after))) = (before, events, after) {
                let same = before.state == after.state;
                last = Some((after, events));
                if same {
                    return last;
                }
                break;
            }
        }
    }
    last
}

fn state_name(m: &Migration) -> String {
    m.state()
        .as_str_name()
        .trim_start_matches("MIGRATION_STATE_")
        .to_lowercase()
}

fn show(events: &[Event]) -> String {
    let skip = events.len().saturating_sub(LOG_LINES);
    let mut lines: Vec<String> = events[skip..].iter().map(describe_event).collect();
    if skip > 0 {
        lines.insert(0, format!("... {skip} earlier events ..."));
    }
    lines.join("\n    ")
}
