//! One generated call of every RPC of the three services: [`Call::generate`]
//! picks an RPC and fills its request, valid (so real migrations exist and
//! run) or hostile; [`Call::send`] sends it and returns its status code.

use std::time::Duration;

use prost_types::Struct;
use rand::Rng;
use rand::rngs::StdRng;
use stagecoach_proto::v1::*;
use tonic::{Code, Status};

use super::values::{count, id, small_structure, string, structure, timestamp};
use crate::client::Client;

/// What the fuzzer has learned about the coordinator, to aim at real ids.
#[derive(Debug, Default, Clone)]
pub struct Known {
    pub plans: Vec<String>,
    pub migrations: Vec<i64>,
    pub pools: Vec<String>,
    /// Worker ids that may be drained (the fuzzer's own, never the real
    /// workers, which must keep running migrations).
    pub fake_workers: Vec<String>,
    /// Every connected worker id, real ones first.
    pub workers: Vec<String>,
    /// Live leases and the worker that holds each (from ListWorkers).
    pub leases: Vec<(String, LeaseToken)>,
}

/// How many recent migration ids [`Known`] keeps.
const KEEP_MIGRATIONS: usize = 2000;

impl Known {
    pub fn add_migration(&mut self, id: i64) {
        if !self.migrations.contains(&id) {
            if self.migrations.len() >= KEEP_MIGRATIONS {
                self.migrations.remove(0);
            }
            self.migrations.push(id);
        }
    }
}

/// One request of one RPC.
#[derive(Debug, Clone)]
pub enum Call {
    PutPlan(PutPlanRequest),
    GetPlan(GetPlanRequest),
    ListPlans(ListPlansRequest),
    CreateMigration(CreateMigrationRequest),
    GetMigration(GetMigrationRequest),
    ListMigrations(ListMigrationsRequest),
    WatchMigration(WatchMigrationRequest),
    CancelMigration(CancelMigrationRequest),
    RetryMigration(RetryMigrationRequest),
    GetSubjectStatus(GetSubjectStatusRequest),
    ListEvents(ListEventsRequest),
    Subscribe(SubscribeRequest),
    Heartbeat(HeartbeatRequest),
    Complete(CompleteRequest),
    Fail(FailRequest),
    ListPools(ListPoolsRequest),
    CreatePool(CreatePoolRequest),
    SetPoolSlots(SetPoolSlotsRequest),
    PausePool(PausePoolRequest),
    ResumePool(ResumePoolRequest),
    ListWorkers(ListWorkersRequest),
    DrainWorker(DrainWorkerRequest),
    DeletePlan(DeletePlanRequest),
    UndrainWorker(UndrainWorkerRequest),
}

/// Kinds the real workers run, and a few they do not.
const KINDS: &[&str] = &["noop", "noop", "sleep", "fail", "unknown-kind", ""];

/// A valid plan named `name` of real kinds, for runs that finish.
pub fn good_plan(name: &str, rng: &mut StdRng) -> Plan {
    let stages = (0..rng.random_range(1..4))
        .map(|i| StageSpec {
            name: format!("s{i}"),
            serial: rng.random_bool(0.3),
            dynamic: false,
            tasks: (0..rng.random_range(1..4))
                .map(|_| {
                    let (kind, payload) = match rng.random_range(0..6) {
                        0 => ("sleep", serde_json::json!({"ms": rng.random_range(0..50)})),
                        1 => (
                            "fail",
                            serde_json::json!({"retryable": rng.random::<bool>()}),
                        ),
                        _ => ("noop", serde_json::json!({})),
                    };
                    TaskSpec {
                        kind: kind.into(),
                        payload: Some(stagecoach_proto::json::json_to_struct(&payload)),
                        max_attempts: 2,
                        retry: None,
                    }
                })
                .collect(),
            retry: Some(RetryPolicy {
                max_attempts: 2,
                initial_backoff_ms: 10,
                max_backoff_ms: 50,
                ..Default::default()
            }),
        })
        .collect();
    Plan {
        name: name.into(),
        version: 0,
        description: String::new(),
        stages,
    }
}

fn hostile_plan(rng: &mut StdRng, k: &Known) -> Plan {
    let stages = (0..[0, 1, 2, 30][rng.random_range(0..4)])
        .map(|_| StageSpec {
            name: string(rng, &[]),
            serial: rng.random(),
            dynamic: rng.random(),
            tasks: (0..[0, 1, 3, 200][rng.random_range(0..4)])
                .map(|_| TaskSpec {
                    kind: if rng.random_bool(0.9) {
                        KINDS[rng.random_range(0..KINDS.len())].into()
                    } else {
                        string(rng, &[])
                    },
                    payload: rng.random_bool(0.7).then(|| small_structure(rng)),
                    max_attempts: count(rng),
                    retry: rng.random_bool(0.5).then(|| retry(rng)),
                })
                .collect(),
            retry: rng.random_bool(0.5).then(|| retry(rng)),
        })
        .collect();
    Plan {
        name: string(rng, &k.plans),
        version: count(rng),
        description: string(rng, &[]),
        stages,
    }
}

fn retry(rng: &mut StdRng) -> RetryPolicy {
    RetryPolicy {
        max_attempts: count(rng),
        initial_backoff_ms: count(rng),
        max_backoff_ms: count(rng),
        attempt_timeout_ms: count(rng),
        heartbeat_timeout_ms: count(rng),
    }
}

fn lease(rng: &mut StdRng, k: &Known) -> (String, LeaseToken) {
    if !k.leases.is_empty() && rng.random_bool(0.6) {
        let (w, l) = k.leases[rng.random_range(0..k.leases.len())].clone();
        // Someone else's lease, or its own with the wrong attempt.
        match rng.random_range(0..4) {
            0 => (string(rng, &k.workers), l),
            1 => (
                w,
                LeaseToken {
                    task_id: l.task_id,
                    attempt: l.attempt.wrapping_add(rng.random_range(1..3)),
                },
            ),
            _ => (w, l),
        }
    } else {
        let task_id = id(rng, &[]);
        (
            string(rng, &k.workers),
            LeaseToken {
                task_id,
                attempt: count(rng),
            },
        )
    }
}

fn opt_struct(rng: &mut StdRng) -> Option<Struct> {
    rng.random_bool(0.6).then(|| structure(rng))
}

/// A repeated field inside a repeated field: at most a few.
fn small_batch<T>(rng: &mut StdRng, mut one: impl FnMut(&mut StdRng) -> T) -> Vec<T> {
    let n = rng.random_range(0..4);
    (0..n).map(|_| one(rng)).collect()
}

fn batch<T>(rng: &mut StdRng, mut one: impl FnMut(&mut StdRng) -> T) -> Vec<T> {
    let n = [0, 1, 1, 1, 2, 5, 300][rng.random_range(0..7)];
    (0..n).map(|_| one(rng)).collect()
}

impl Call {
    /// A call of a random RPC; about a third are valid.
    pub fn generate(rng: &mut StdRng, k: &Known) -> Call {
        let valid = rng.random_bool(0.35);
        let mig = |rng: &mut StdRng| id(rng, &k.migrations);
        match rng.random_range(0..24) {
            0 => Call::PutPlan(PutPlanRequest {
                source: Some(match rng.random_range(0..4) {
                    _ if valid => put_plan_request::Source::Plan(good_plan(
                        &format!("fz-plan-{}", rng.random_range(0..20)),
                        rng,
                    )),
                    0 => put_plan_request::Source::PlanJson(string(rng, &[])),
                    1 => {
                        put_plan_request::Source::PlanJson("[".repeat(rng.random_range(1..100_000)))
                    }
                    _ => put_plan_request::Source::Plan(hostile_plan(rng, k)),
                })
                .filter(|_| rng.random_ratio(19, 20)),
            }),
            1 => Call::GetPlan(GetPlanRequest {
                name: string(rng, &k.plans),
            }),
            2 => Call::ListPlans(ListPlansRequest {
                page_size: count(rng),
                page_token: string(rng, &k.plans),
                include_tasks: rng.random(),
            }),
            3 if valid && !k.plans.is_empty() => Call::CreateMigration(CreateMigrationRequest {
                plan_source: Some(create_migration_request::PlanSource::PlanName(
                    k.plans[rng.random_range(0..k.plans.len())].clone(),
                )),
                subject: format!("fz/{}", rng.random::<u32>()),
                parameters: None,
                pool: String::new(),
                deadline: None,
                idempotency_key: String::new(),
            }),
            3 => Call::CreateMigration(CreateMigrationRequest {
                plan_source: match rng.random_range(0..3) {
                    0 => None,
                    1 => Some(create_migration_request::PlanSource::PlanName(string(
                        rng, &k.plans,
                    ))),
                    _ => Some(create_migration_request::PlanSource::InlinePlan(
                        hostile_plan(rng, k),
                    )),
                },
                subject: string(rng, &[]),
                parameters: opt_struct(rng),
                pool: string(rng, &k.pools),
                deadline: rng.random_bool(0.3).then(|| timestamp(rng)),
                idempotency_key: string(rng, &[]),
            }),
            4 => Call::GetMigration(GetMigrationRequest {
                migration_id: mig(rng),
            }),
            5 => Call::ListMigrations(ListMigrationsRequest {
                state: rng.random_range(-1..8),
                subject: string(rng, &[]),
                pool: string(rng, &k.pools),
                page_size: count(rng),
                page_token: string(rng, &[]),
            }),
            6 => Call::WatchMigration(WatchMigrationRequest {
                migration_id: mig(rng),
                after_event_id: id(rng, &[]),
            }),
            7 => Call::CancelMigration(CancelMigrationRequest {
                migration_id: mig(rng),
                reason: string(rng, &[]),
            }),
            8 => Call::RetryMigration(RetryMigrationRequest {
                migration_id: mig(rng),
            }),
            9 => Call::GetSubjectStatus(GetSubjectStatusRequest {
                subject: string(rng, &[]),
            }),
            10 => Call::ListEvents(ListEventsRequest {
                migration_id: mig(rng),
                after_event_id: id(rng, &[]),
                limit: count(rng),
            }),
            11 => Call::Subscribe(SubscribeRequest {
                worker_id: if valid {
                    format!("fz-w{}", rng.random_range(0..50))
                } else {
                    string(rng, &k.workers)
                },
                kinds: batch(rng, |rng| {
                    if rng.random_bool(0.5) {
                        KINDS[rng.random_range(0..KINDS.len())].into()
                    } else {
                        string(rng, &[])
                    }
                }),
                slots: count(rng),
                name: string(rng, &[]),
                instance: rng.random(),
            }),
            12 => {
                let (worker_id, _) = lease(rng, k);
                Call::Heartbeat(HeartbeatRequest {
                    worker_id,
                    leases: batch(rng, |rng| LeaseStatus {
                        lease: rng.random_bool(0.9).then(|| lease(rng, k).1),
                        done: rng.random(),
                        total: rng.random(),
                        checkpoint: rng.random_bool(0.3).then(|| string(rng, &[]).into_bytes()),
                        // Forged: the fuzzer never learns a lease's secret.
                        lease_secret: rng.random(),
                    }),
                })
            }
            13 => {
                let (worker_id, l) = lease(rng, k);
                Call::Complete(CompleteRequest {
                    worker_id,
                    completions: batch(rng, |rng| Completion {
                        lease: rng.random_bool(0.95).then_some(l),
                        output: rng.random_bool(0.5).then(|| small_structure(rng)),
                        add_tasks: small_batch(rng, |rng| NewTask {
                            stage: string(rng, &[]),
                            kind: KINDS[rng.random_range(0..KINDS.len())].into(),
                            payload: rng.random_bool(0.5).then(|| small_structure(rng)),
                            max_attempts: count(rng),
                            retry: rng.random_bool(0.3).then(|| retry(rng)),
                        }),
                        lease_secret: rng.random(),
                    }),
                })
            }
            14 => {
                let (worker_id, l) = lease(rng, k);
                Call::Fail(FailRequest {
                    worker_id,
                    failures: batch(rng, |rng| Failure {
                        lease: rng.random_bool(0.95).then_some(l),
                        error: string(rng, &[]),
                        retryable: rng.random(),
                        lease_secret: rng.random(),
                    }),
                })
            }
            15 => Call::ListPools(ListPoolsRequest {}),
            16 => Call::CreatePool(CreatePoolRequest {
                name: string(rng, &[]),
                slots: count(rng),
            }),
            17 => Call::SetPoolSlots(SetPoolSlotsRequest {
                name: pool(rng, k),
                slots: count(rng),
            }),
            18 => Call::PausePool(PausePoolRequest { name: pool(rng, k) }),
            19 => Call::ResumePool(ResumePoolRequest { name: pool(rng, k) }),
            20 => Call::ListWorkers(ListWorkersRequest {}),
            21 => Call::DeletePlan(DeletePlanRequest {
                // Rarely a plan that valid migrations use: they then get
                // NOT_FOUND until a PutPlan brings it back.
                name: if rng.random_ratio(1, 10) {
                    string(rng, &k.plans)
                } else {
                    string(rng, &[])
                },
            }),
            22 => Call::UndrainWorker(UndrainWorkerRequest {
                worker_id: string(rng, &k.fake_workers),
            }),
            _ => Call::DrainWorker(DrainWorkerRequest {
                worker_id: string(rng, &k.fake_workers),
            }),
        }
    }

    /// The RPC's name, for the report.
    pub fn rpc(&self) -> &'static str {
        match self {
            Call::PutPlan(_) => "PutPlan",
            Call::GetPlan(_) => "GetPlan",
            Call::ListPlans(_) => "ListPlans",
            Call::CreateMigration(_) => "CreateMigration",
            Call::GetMigration(_) => "GetMigration",
            Call::ListMigrations(_) => "ListMigrations",
            Call::WatchMigration(_) => "WatchMigration",
            Call::CancelMigration(_) => "CancelMigration",
            Call::RetryMigration(_) => "RetryMigration",
            Call::GetSubjectStatus(_) => "GetSubjectStatus",
            Call::ListEvents(_) => "ListEvents",
            Call::Subscribe(_) => "Subscribe",
            Call::Heartbeat(_) => "Heartbeat",
            Call::Complete(_) => "Complete",
            Call::Fail(_) => "Fail",
            Call::ListPools(_) => "ListPools",
            Call::CreatePool(_) => "CreatePool",
            Call::SetPoolSlots(_) => "SetPoolSlots",
            Call::PausePool(_) => "PausePool",
            Call::ResumePool(_) => "ResumePool",
            Call::ListWorkers(_) => "ListWorkers",
            Call::DrainWorker(_) => "DrainWorker",
            Call::DeletePlan(_) => "DeletePlan",
            Call::UndrainWorker(_) => "UndrainWorker",
        }
    }

    /// Sends it; returns the answer's status (OK on success) and what it
    /// taught about the coordinator's ids.
    pub async fn send(self, c: &Client) -> (Status, Learned) {
        let mut learned = Learned::default();
        let r: Result<(), Status> = async {
            let (mut m, mut w, mut a) = (c.migrations.clone(), c.workers.clone(), c.admin.clone());
            match self {
                Call::PutPlan(r) => {
                    let plan = m.put_plan(r).await?.into_inner().plan;
                    learned.plan = plan.map(|p| p.name);
                }
                Call::GetPlan(r) => drop(m.get_plan(r).await?),
                Call::ListPlans(r) => drop(m.list_plans(r).await?),
                Call::CreateMigration(r) => {
                    let mig = m.create_migration(r).await?.into_inner().migration;
                    learned.migration = mig.map(|m| m.id);
                }
                Call::GetMigration(r) => drop(m.get_migration(r).await?),
                Call::ListMigrations(r) => drop(m.list_migrations(r).await?),
                Call::WatchMigration(r) => {
                    let mut s = m.watch_migration(r).await?.into_inner();
                    first_message(s.message()).await?;
                }
                Call::CancelMigration(r) => drop(m.cancel_migration(r).await?),
                Call::RetryMigration(r) => drop(m.retry_migration(r).await?),
                Call::GetSubjectStatus(r) => drop(m.get_subject_status(r).await?),
                Call::ListEvents(r) => drop(m.list_events(r).await?),
                Call::Subscribe(r) => {
                    learned.worker = Some(r.worker_id.clone());
                    let mut s = w.subscribe(r).await?.into_inner();
                    first_message(s.message()).await?;
                }
                Call::Heartbeat(r) => drop(w.heartbeat(r).await?),
                Call::Complete(r) => drop(w.complete(r).await?),
                Call::Fail(r) => drop(w.fail(r).await?),
                Call::ListPools(r) => drop(a.list_pools(r).await?),
                Call::CreatePool(r) => {
                    let pool = a.create_pool(r).await?.into_inner().pool;
                    learned.pool = pool.map(|p| p.name);
                }
                Call::SetPoolSlots(r) => drop(a.set_pool_slots(r).await?),
                Call::PausePool(r) => drop(a.pause_pool(r).await?),
                Call::ResumePool(r) => drop(a.resume_pool(r).await?),
                Call::ListWorkers(r) => drop(a.list_workers(r).await?),
                Call::DrainWorker(r) => drop(a.drain_worker(r).await?),
                Call::DeletePlan(r) => drop(m.delete_plan(r).await?),
                Call::UndrainWorker(r) => drop(a.undrain_worker(r).await?),
            }
            Ok(())
        }
        .await;
        (r.err().unwrap_or_else(|| Status::ok("")), learned)
    }
}

/// Ids a successful call revealed.
#[derive(Debug, Default)]
pub struct Learned {
    pub plan: Option<String>,
    pub migration: Option<i64>,
    pub pool: Option<String>,
    pub worker: Option<String>,
}

/// A pool the fuzzer made, or a random name; never `default`, whose
/// slots the valid migrations need.
fn pool(rng: &mut StdRng, k: &Known) -> String {
    let name = string(rng, &k.pools);
    if name == "default" {
        "fz-pool".into()
    } else {
        name
    }
}

/// Waits briefly for a stream's first message: an error status counts, a
/// quiet stream is fine (the call is dropped, which cancels it).
async fn first_message<T>(
    next: impl std::future::Future<Output = Result<Option<T>, Status>>,
) -> Result<(), Status> {
    match tokio::time::timeout(Duration::from_millis(100), next).await {
        Ok(Err(s)) => Err(s),
        _ => Ok(()),
    }
}

/// True for the codes a merely-bad request must never get.
pub fn is_server_fault(code: Code) -> bool {
    matches!(code, Code::Internal | Code::Unknown | Code::DataLoss)
}
