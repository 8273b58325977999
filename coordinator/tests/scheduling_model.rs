//! A property test of the scheduling core: random interleavings of create,
//! admit, claim, heartbeat, expire, complete, fail, stale and repeated
//! reports, cancel, retry and slot changes, run against the real store, with
//! a small reference model of which leases are live. After every step the
//! invariants I1–I5, I8 and I12 are checked from the store's views and its
//! event log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use stagecoach_coordinator::domain::{
    Assignment, Completion, EventKind, Failure, LeaseSecret, LeaseStatus, LeaseToken,
    MigrationState, NewMigration, NewTask, PlanSpec, ReportAck, StageState, TaskSpec,
};
use stagecoach_coordinator::error::Error;
use stagecoach_coordinator::store::{Limits, Report, SqliteStore, Store};

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
const SUBJECTS: [&str; 4] = ["s0", "s1", "s2", "s3"];

#[derive(Debug, Clone)]
enum Op {
    Create {
        subject: usize,
        plan: usize,
    },
    Claim {
        worker: usize,
        slots: u32,
    },
    Complete {
        pick: usize,
        fan_out: bool,
    },
    /// Two live leases and a repeat of the first, in one batch.
    CompleteBatch {
        pick: usize,
    },
    Fail {
        pick: usize,
        retryable: bool,
    },
    Stale {
        pick: usize,
    },
    Heartbeat {
        worker: usize,
    },
    Expire,
    Cancel {
        pick: usize,
    },
    Retry {
        pick: usize,
    },
    SetSlots {
        slots: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SUBJECTS.len(), 0..3usize).prop_map(|(subject, plan)| Op::Create { subject, plan }),
        4 => (0..WORKERS.len(), 1..4u32).prop_map(|(worker, slots)| Op::Claim { worker, slots }),
        5 => (any::<usize>(), any::<bool>()).prop_map(|(pick, fan_out)| Op::Complete { pick, fan_out }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, retryable)| Op::Fail { pick, retryable }),
        2 => any::<usize>().prop_map(|pick| Op::CompleteBatch { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Stale { pick }),
        1 => (0..WORKERS.len()).prop_map(|worker| Op::Heartbeat { worker }),
        1 => Just(Op::Expire),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => (1..4u32).prop_map(|slots| Op::SetSlots { slots }),
    ]
}

fn plans() -> Vec<PlanSpec> {
    let docs = [
        json!({"name": "two", "stages": [
            {"name": "a", "tasks": [{"kind": "k"}, {"kind": "k"}]},
            {"name": "b", "tasks": [{"kind": "k"}]}]}),
        json!({"name": "fan", "stages": [
            {"name": "a", "serial": true, "tasks": [{"kind": "k"}, {"kind": "k"}]},
            {"name": "b", "dynamic": true},
            {"name": "c", "tasks": [{"kind": "k"}]}]}),
        json!({"name": "retry", "stages": [
            {"name": "a", "retry": {"max_attempts": 2, "initial_backoff_ms": 1, "max_backoff_ms": 1},
             "tasks": [{"kind": "k"}]}]}),
    ];
    docs.iter()
        .map(|d| {
            let p = PlanSpec::from_json(&d.to_string()).unwrap();
            p.validate("", 2_000).unwrap();
            p
        })
        .collect()
}

/// What the model knows: which leases are live and which reports were taken.
#[derive(Default)]
struct Model {
    migrations: Vec<i64>,
    /// Live leases by worker, exactly as the store must hold them.
    held: BTreeMap<&'static str, Vec<Assignment>>,
    issued: Vec<(LeaseToken, LeaseSecret)>,
    completed: HashSet<LeaseToken>,
    /// Lowering a pool's slots does not stop running migrations: until
    /// enough of them finish, up to this many may still run.
    allowed_running: u32,
}

impl Model {
    fn all_held(&self) -> Vec<(&'static str, Assignment)> {
        self.held
            .iter()
            .flat_map(|(w, v)| v.iter().map(|a| (*w, a.clone())))
            .collect()
    }

    fn drop_lease(&mut self, lease: LeaseToken) {
        for v in self.held.values_mut() {
            v.retain(|a| a.lease != lease);
        }
    }

    fn drop_migration(&mut self, id: i64) {
        for v in self.held.values_mut() {
            v.retain(|a| a.migration_id != id);
        }
    }
}

async fn step(s: &SqliteStore, m: &mut Model, plans: &[PlanSpec], op: &Op) {
    match op {
        Op::Create { subject, plan } => {
            let busy = s
                .subject_status(SUBJECTS[*subject])
                .await
                .unwrap()
                .latest
                .is_some_and(|l| !l.state.is_terminal());
            let new = NewMigration {
                plan: plans[*plan].clone(),
                subject: SUBJECTS[*subject].into(),
                parameters: json!({}),
                pool: "default".into(),
                deadline_ms: None,
                idempotency_key: None,
                created_by: None,
            };
            match s.create_migration(&new).await {
                Ok((c, _)) => {
                    assert!(
                        !busy,
                        "I8: a second unfinished run of a busy subject was created"
                    );
                    m.migrations.push(c.migration_id);
                }
                Err(Error::AlreadyExists(_)) => assert!(busy, "AlreadyExists for an idle subject"),
                Err(e) => panic!("create: {e}"),
            }
        }
        Op::Claim { worker, slots } => {
            let w = WORKERS[*worker];
            let held = m.held.get(w).map_or(0, Vec::len) as u32;
            let got = s.claim(w, &["k".to_string()], *slots).await.unwrap();
            assert!(
                held + got.len() as u32 <= (*slots).max(held),
                "I12: {w} got {} over {held} held with {slots} slots",
                got.len()
            );
            for a in &got {
                let mig = s.get_migration(a.migration_id).await.unwrap().unwrap();
                assert_eq!(
                    mig.state,
                    MigrationState::Running,
                    "I9: assigned from a {} migration",
                    mig.state
                );
                let idx = a.stage_index as usize;
                assert_eq!(
                    mig.stages[idx].state,
                    StageState::Running,
                    "I1: assigned from a stage that is not running"
                );
                assert!(
                    mig.stages[..idx]
                        .iter()
                        .all(|st| st.state == StageState::Succeeded),
                    "I1: earlier stage unfinished"
                );
                m.issued.push((a.lease, a.secret));
            }
            m.held.entry(w).or_default().extend(got);
        }
        Op::Complete { pick, fan_out } => {
            let all = m.all_held();
            if all.is_empty() {
                return;
            }
            let (w, a) = &all[pick % all.len()];
            let mig = s.get_migration(a.migration_id).await.unwrap().unwrap();
            let add_tasks =
                if *fan_out && mig.plan_name == "fan" && mig.stages[1].state == StageState::Pending
                {
                    (0..2)
                        .map(|i| NewTask {
                            stage: "b".into(),
                            task: TaskSpec::new("k", json!({"i": i})),
                        })
                        .collect()
                } else {
                    vec![]
                };
            let c = Completion {
                lease: a.lease,
                secret: a.secret,
                output: json!({}),
                add_tasks,
            };
            let (ack, fx) = s
                .complete(w, &c)
                .await
                .unwrap_or_else(|e| panic!("a live lease was refused: {e}"));
            assert_eq!(ack, ReportAck::Recorded);
            m.completed.insert(a.lease);
            m.drop_lease(a.lease);
            for r in fx.revoked {
                m.drop_lease(r.lease);
            }
        }
        Op::CompleteBatch { pick } => {
            let all = m.all_held();
            if all.len() < 2 {
                return;
            }
            let (w1, a1) = &all[pick % all.len()];
            let (w2, a2) = &all[(pick + 1) % all.len()];
            let report = |w: &str, a: &Assignment| {
                (
                    w.to_string(),
                    Report::Complete(Completion {
                        lease: a.lease,
                        secret: a.secret,
                        output: json!({"t": a.lease.task_id}),
                        add_tasks: vec![],
                    }),
                )
            };
            let batch = [report(w1, a1), report(w2, a2), report(w1, a1)];
            let results = s.report_many(&batch).await.unwrap();
            let acks: Vec<_> = results
                .into_iter()
                .map(|r| r.map(|(ack, _)| ack).unwrap_or_else(|e| panic!("{e}")))
                .collect();
            assert_eq!(
                acks,
                [
                    ReportAck::Recorded,
                    ReportAck::Recorded,
                    ReportAck::Duplicate
                ]
            );
            for a in [a1, a2] {
                m.completed.insert(a.lease);
                m.drop_lease(a.lease);
            }
        }
        Op::Fail { pick, retryable } => {
            let all = m.all_held();
            if all.is_empty() {
                return;
            }
            let (w, a) = &all[pick % all.len()];
            let f = Failure {
                lease: a.lease,
                secret: a.secret,
                error: "boom".into(),
                retryable: *retryable,
            };
            let (ack, fx) = s
                .fail(w, &f)
                .await
                .unwrap_or_else(|e| panic!("a live lease was refused: {e}"));
            assert_eq!(ack, ReportAck::Recorded);
            m.drop_lease(a.lease);
            for r in fx.revoked {
                m.drop_lease(r.lease);
            }
        }
        Op::Stale { pick } => {
            if m.issued.is_empty() {
                return;
            }
            let (lease, secret) = m.issued[pick % m.issued.len()];
            let owner = m
                .all_held()
                .into_iter()
                .find(|(_, a)| a.lease == lease)
                .map(|(w, _)| w);
            if owner.is_some() {
                return; // live: not a stale report
            }
            let before = snapshot(s, &m.migrations).await;
            let r = s
                .complete(
                    "w0",
                    &Completion {
                        lease,
                        secret,
                        output: json!({}),
                        add_tasks: vec![],
                    },
                )
                .await;
            match r {
                Ok((ReportAck::Duplicate, _)) => assert!(
                    m.completed.contains(&lease),
                    "I4: duplicate of a report never made"
                ),
                Err(Error::LeaseNotHeld(_)) => {}
                other => panic!("I4: a stale report was taken: {other:?}"),
            }
            assert_eq!(
                before,
                snapshot(s, &m.migrations).await,
                "I4: a stale report changed state"
            );
        }
        Op::Heartbeat { worker } => {
            let w = WORKERS[*worker];
            let leases: Vec<_> = m
                .held
                .get(w)
                .into_iter()
                .flatten()
                .map(|a| LeaseStatus {
                    lease: a.lease,
                    secret: a.secret,
                    done: 1,
                    total: 2,
                    checkpoint: Some(vec![1]),
                })
                .collect();
            let out = s.heartbeat(w, &leases).await.unwrap();
            assert!(
                out.cancel.is_empty(),
                "the model's live leases were not live: {:?}",
                out.cancel
            );
            assert_eq!(out.renewed.len(), leases.len());
        }
        Op::Expire => {
            // Leases last 1 ms here: after 2 ms every one has expired.
            tokio::time::sleep(Duration::from_millis(2)).await;
            s.sweep().await.unwrap();
            m.held.clear();
        }
        Op::Cancel { pick } => {
            if m.migrations.is_empty() {
                return;
            }
            let id = m.migrations[pick % m.migrations.len()];
            match s.cancel_migration(id, "test").await {
                Ok(_) => m.drop_migration(id),
                Err(Error::FailedPrecondition(_)) => {}
                Err(e) => panic!("cancel: {e}"),
            }
        }
        Op::Retry { pick } => {
            if m.migrations.is_empty() {
                return;
            }
            let id = m.migrations[pick % m.migrations.len()];
            match s.retry_migration(id).await {
                Ok(_) | Err(Error::FailedPrecondition(_)) | Err(Error::AlreadyExists(_)) => {}
                Err(e) => panic!("retry: {e}"),
            }
        }
        Op::SetSlots { slots } => {
            let (pool, _) = s.set_pool_slots("default", *slots).await.unwrap();
            m.allowed_running = pool.running.max(*slots);
        }
    }
}

/// Every migration's state and stage counters, to compare before and after.
async fn snapshot(s: &SqliteStore, ids: &[i64]) -> Vec<String> {
    let mut out = vec![];
    for id in ids {
        let m = s.get_migration(*id).await.unwrap().unwrap();
        out.push(format!(
            "{:?} {:?}",
            m.state,
            m.stages
                .iter()
                .map(|s| (s.state, s.succeeded, s.failed, s.canceled, s.total))
                .collect::<Vec<_>>()
        ));
    }
    out
}

async fn check(s: &SqliteStore, m: &mut Model) {
    // I12 and the model: the store holds exactly the leases the model says.
    for w in WORKERS {
        let mut want: Vec<_> = m
            .held
            .get(w)
            .into_iter()
            .flatten()
            .map(|a| a.lease)
            .collect();
        want.sort();
        assert_eq!(s.live_leases(w).await.unwrap(), want, "live leases of {w}");
    }
    // I3: within the pool's slots, and no slot left free while one is queued.
    let pool = s
        .list_pools()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.name == "default")
        .unwrap();
    assert!(
        pool.running <= m.allowed_running,
        "I3: {} running over {} slots",
        pool.running,
        pool.slots
    );
    assert!(
        pool.queued == 0 || pool.running >= pool.slots,
        "I3: {} queued with a free slot",
        pool.queued
    );
    m.allowed_running = pool.running.max(pool.slots);
    let mut unfinished: HashMap<String, i64> = HashMap::new();
    for id in &m.migrations {
        let mig = s.get_migration(*id).await.unwrap().unwrap();
        if !mig.state.is_terminal()
            && let Some(other) = unfinished.insert(mig.subject.clone(), mig.id)
        {
            panic!(
                "I8: {other} and {} both unfinished for {}",
                mig.id, mig.subject
            );
        }
        // Stage shape: finished stages first, at most one running, then pending.
        let running = mig
            .stages
            .iter()
            .filter(|st| st.state == StageState::Running)
            .count();
        assert!(running <= 1, "one stage at a time");
        if mig.state == MigrationState::Succeeded {
            assert!(
                mig.stages
                    .iter()
                    .all(|st| st.state == StageState::Succeeded)
            );
        }
        for st in &mig.stages {
            if matches!(
                st.state,
                StageState::Succeeded | StageState::Failed | StageState::Canceled
            ) {
                assert_eq!(
                    st.total,
                    st.succeeded + st.failed + st.canceled,
                    "I5 counters of {st:?}"
                );
            }
        }
        // I2: one start per stage per run, from the event log.
        let events = s.list_events(*id, 0, 100_000).await.unwrap();
        let mut started = HashSet::new();
        let mut last = 0;
        for e in &events {
            assert!(e.id > last, "event ids increase");
            last = e.id;
            match e.kind {
                EventKind::MigrationRetried => started.clear(),
                EventKind::StageStarted => assert!(
                    started.insert(e.stage_index),
                    "I2: stage {:?} started twice",
                    e.stage_index
                ),
                _ => {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("m.db").display());
            let s = SqliteStore::open(&url, Limits { lease_ms: 1, heartbeat_interval_ms: 1, max_reassignments: 3 }).await.unwrap();
            s.ensure_pool("default", 2).await.unwrap();
            let plans = plans();
            let mut m = Model { allowed_running: 2, ..Model::default() };
            for op in &ops {
                step(&s, &mut m, &plans, op).await;
                check(&s, &mut m).await;
            }
        });
    }
}
