//! Several coordinators on one PostgreSQL database (docs/design.md,
//! "Persistence"): row locks keep the invariants across processes, and
//! LISTEN/NOTIFY carries what one coordinator commits to the others.
//!
//! - **A fleet**: three coordinators, twelve worker processes (each knowing
//!   exactly one coordinator, four per coordinator), a pool of 5 slots set
//!   through one of them, twenty migrations created round-robin through all
//!   three. Each migration fans out at run time: its first task, run by a
//!   raw worker on coordinator 0, adds 200 `noop`/`sleep` tasks to a dynamic
//!   stage, so every task the other coordinators' workers run was made ready
//!   by coordinator 0 and reached them by NOTIFY. All succeed; every log
//!   passes the invariant checker; each stage starts exactly once; at most
//!   5 migrations run at once (the merged log, and ListPools sampled
//!   throughout); no worker holds more leases than its slots.
//! - **The fleet with a `kill -9`**: the same, with every worker knowing all
//!   three coordinators. Mid-run the coordinator streaming to the most
//!   workers is killed; its workers move to the two live ones; later a fresh
//!   process starts on the same database and address, and the last
//!   migrations are created through it. Nothing is lost: every migration
//!   succeeds, every task succeeded exactly once, and the checks above hold.
//! - **Racing admission**: a pool of 1 slot; ten times, two migrations are
//!   created at the same instant, one through each of two coordinators:
//!   exactly one of the answers is RUNNING, ListPools (sampled through both
//!   throughout) never shows more than one running, nor does the log.
//! - **Cancel across coordinators**: a worker process streaming only from
//!   coordinator B runs a long `sleep` with a cancel marker, beside a raw
//!   worker on B holding a second task; CancelMigration through A: the raw
//!   worker gets its cancel notice on its stream from B (so it travelled by
//!   NOTIFY), the sleep's marker appears within seconds, and the migration
//!   is CANCELED as both coordinators tell.
//!
//! The two fleet tests take turns ([`HEAVY`]): on a two-core machine, 30
//! processes each are enough.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::{
    CompleteRequest, Completion, CreateMigrationRequest, CreatePoolRequest, Event, EventKind,
    MigrationState, NewTask, Plan, SetPoolSlotsRequest,
};
use stagecoach_tests::plans::{StageExt, create_inline, plan, stage, task};
use stagecoach_tests::{
    Client, CommitOrder, FAST, FakeWorker, Fleet, check_capacity, check_worker_slots,
    describe_event, of_kind, wait_for,
};
use tokio::task::JoinHandle;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(240);
/// The kind only the raw fan-out worker handles.
const FANOUT: &str = "fake.fanout";
/// The raw worker that runs the fan-out tasks.
const FAN_OUT_WORKER: &str = "fan-out";
/// Tasks each fan-out adds.
const WIDTH: usize = 200;
const MIGRATIONS: usize = 20;
const POOL_SLOTS: usize = 5;
const WORKERS: usize = 12;
const WORKER_SLOTS: u32 = 8;
/// How long (database time) the merged log may show a migration waiting
/// beside a free slot: one transaction that ends a migration and refills its
/// slot, at worst waiting for the pool's row lock. Generous, for a loaded
/// two-core machine; a few milliseconds when idle.
const LONGEST_WAIT_MS: i64 = 3_000;

/// Coordinator timings of the fleet tests: heartbeats every second (twelve
/// workers' renewals are a good part of the database's load), leases of
/// 5 s, sweeps every 250 ms. Thirty processes on two cores are slow at
/// times; [`FAST`]'s 1.5 s leases would expire while nothing is wrong.
const FLEET_TIMING: [&str; 6] = [
    "--heartbeat-interval-ms",
    "1000",
    "--lease-duration-ms",
    "5000",
    "--sweep-interval-ms",
    "250",
];

/// The two fleet tests take turns.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_on_one_database_keeps_every_invariant() {
    let _turn = HEAVY.lock().await;
    run_fleet(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_loses_nothing_when_a_coordinator_is_killed() {
    let _turn = HEAVY.lock().await;
    run_fleet(true).await;
}

/// fan-out (1 raw task) → work (dynamic: WIDTH tasks) → done (1 noop).
fn fleet_plan() -> Plan {
    plan(
        "fleet",
        vec![
            stage("fan-out", vec![task(FANOUT, json!({}))]),
            stage("work", vec![]).dynamic(),
            stage("done", vec![task("noop", json!({}))]),
        ],
    )
}

/// Runs every fan-out task on a raw worker subscribed to coordinator 0:
/// completes each with WIDTH tasks, one in ten a 20 ms `sleep`, the rest
/// `noop`, each in a task of its own so one slow commit delays no other.
/// Runs until aborted.
async fn run_fan_out(url: String) -> JoinHandle<()> {
    let mut f = FakeWorker::subscribe(&url, FAN_OUT_WORKER, &[FANOUT], POOL_SLOTS as u32).await;
    tokio::spawn(async move {
        loop {
            let a = f.next_assignment(WAIT).await;
            let mut client = f.raw_client();
            tokio::spawn(async move {
                let add_tasks = (0..WIDTH)
                    .map(|i| {
                        let (kind, payload) = if i % 10 == 0 {
                            ("sleep", json!({"ms": 20, "i": i}))
                        } else {
                            ("noop", json!({"i": i}))
                        };
                        NewTask {
                            stage: "work".into(),
                            kind: kind.into(),
                            payload: Some(json_to_struct(&payload)),
                            ..Default::default()
                        }
                    })
                    .collect();
                let req = CompleteRequest {
                    worker_id: FAN_OUT_WORKER.into(),
                    completions: vec![Completion {
                        lease: a.lease,
                        lease_secret: a.lease_secret,
                        output: Some(json_to_struct(&json!({}))),
                        add_tasks,
                    }],
                };
                match client.complete(req).await {
                    Ok(_) => {}
                    // A lease that expired on a slow machine: its next
                    // attempt comes as another assignment.
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        eprintln!("fan-out of {:?} came too late: {}", a.lease, s.message());
                    }
                    Err(s) => panic!("complete the fan-out of {:?}: {s}", a.lease),
                }
            });
        }
    })
}

/// ListPools, through `clients` in turn, until stopped: the most migrations
/// of `pool` seen running at once, and how many samples were taken.
struct PoolSampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Sampled>,
}

#[derive(Debug, Default)]
struct Sampled {
    samples: usize,
    max_running: u32,
    /// Samples with a migration running and another queued.
    full_with_queue: usize,
}

impl PoolSampler {
    fn start(clients: Vec<Client>, pool: &str) -> PoolSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let pool = pool.to_string();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Sampled::default();
                for client in clients.iter().cycle() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // A coordinator that is down answers nothing: skip it.
                    let answer = tokio::time::timeout(Duration::from_secs(2), client.pool(&pool));
                    if let Ok(Ok(p)) = answer.await {
                        seen.samples += 1;
                        seen.max_running = seen.max_running.max(p.running);
                        if p.running > 0 && p.queued > 0 {
                            seen.full_with_queue += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                seen
            })
        };
        PoolSampler { stop, task }
    }

    async fn finish(self) -> Sampled {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the pool sampler")
    }
}

async fn set_slots(client: &Client, pool: &str, slots: usize) {
    let req = SetPoolSlotsRequest {
        name: pool.into(),
        slots: slots as u32,
    };
    let pool = client.admin.clone().set_pool_slots(req).await;
    let pool = pool.expect("SetPoolSlots").into_inner().pool.unwrap();
    assert_eq!(pool.slots as usize, slots);
}

/// Creates migration `n` of the fleet through `client`.
async fn create(client: &Client, n: usize) -> i64 {
    let req = create_inline(fleet_plan(), &format!("fleet/{n}"));
    client.create(req).await.expect("create").id
}

async fn succeeded(client: &Client) -> usize {
    let all = client.list_migrations().await.unwrap_or_default();
    all.iter()
        .filter(|m| m.state() == MigrationState::Succeeded)
        .count()
}

async fn run_fleet(kill: bool) {
    let started = Instant::now();
    let mut fleet = Fleet::start(3, &FLEET_TIMING).await;
    let clients = [
        fleet.client(0).await,
        fleet.client(1).await,
        fleet.client(2).await,
    ];
    set_slots(&clients[1], "default", POOL_SLOTS).await;
    for i in 0..WORKERS {
        let id = format!("w{}", i + 1);
        // With a kill, every worker knows all three (and shuffles them);
        // without, each knows one, so all three coordinators stream work.
        let of: Vec<usize> = if kill { vec![0, 1, 2] } else { vec![i % 3] };
        fleet.add_worker(&id, WORKER_SLOTS, &of);
    }
    let streams = fleet.wait_for_streams(&[0, 1, 2], WAIT).await;
    let fan_out = run_fan_out(fleet.url(0)).await;
    let sampler = PoolSampler::start(vec![clients[0].clone()], "default");

    let mut ids = Vec::new();
    let mut kills = 0;
    let mut moved = Vec::new();
    if !kill {
        for n in 0..MIGRATIONS {
            ids.push(create(&clients[n % 3], n).await);
        }
    } else {
        let (first, during) = (MIGRATIONS - 6, MIGRATIONS - 3);
        for n in 0..first {
            ids.push(create(&clients[n % 3], n).await);
        }
        wait_for("3 migrations to succeed", WAIT, async || {
            (succeeded(&clients[0]).await >= 3).then_some(())
        })
        .await;
        // Coordinator 0 serves the raw fan-out worker and the sampler; of
        // the other two, kill the one streaming to more workers.
        let count = |c: usize| streams.values().filter(|on| **on == c).count();
        let victim = if count(1) >= count(2) { 1 } else { 2 };
        let survivor = 3 - victim;
        moved = fleet.streams(&[victim]).await.into_keys().collect();
        assert!(!moved.is_empty(), "coordinator {victim} streams to nobody");
        let done_at_kill = succeeded(&clients[0]).await;
        assert!(
            done_at_kill < first,
            "the kill must land mid-run: {done_at_kill} of {first} done"
        );
        fleet.coordinators[victim].kill9().await;
        kills += 1;
        let after = fleet.wait_for_streams(&[0, survivor], WAIT).await;
        for id in &moved {
            assert_ne!(after.get(id), Some(&victim), "{id} still on the victim");
        }
        for n in first..during {
            ids.push(create(&clients[[0, survivor][n % 2]], n).await);
        }
        wait_for("2 more migrations to succeed", WAIT, async || {
            (succeeded(&clients[0]).await >= done_at_kill + 2).then_some(())
        })
        .await;
        // A fresh process on the same database and address.
        fleet.coordinators[victim].restart().await;
        let fresh = fleet.client(victim).await;
        for n in during..MIGRATIONS {
            ids.push(create(&fresh, n).await);
        }
        eprintln!(
            "killed coordinator {victim} with {} of {WORKERS} workers ({moved:?}) after {done_at_kill} migrations; restarted it",
            moved.len()
        );
    }

    for id in &ids {
        let (m, _) = clients[0].finish_and_check(*id, WAIT).await;
        assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
        let totals: Vec<u32> = m.stages.iter().map(|s| s.total).collect();
        assert_eq!(totals, [1, WIDTH as u32, 1], "migration {id}");
        assert!(m.stages.iter().all(|s| s.succeeded == s.total), "{m:?}");
    }
    let elapsed = started.elapsed();
    let sampled = sampler.finish().await;
    fan_out.abort();

    let all = clients[0].all_events().await.expect("all events");
    check_fleet_log(&all, &ids);
    assert!(
        sampled.max_running as usize <= POOL_SLOTS,
        "ListPools: {sampled:?}"
    );
    let seen = check_capacity(&all, POOL_SLOTS, CommitOrder::Concurrent)
        .unwrap_or_else(|e| panic!("capacity:\n  {}", e.join("\n  ")));
    assert_eq!(seen.max_running, POOL_SLOTS, "{seen:?}");
    assert_eq!(seen.admissions, MIGRATIONS, "{seen:?}");
    assert!(seen.longest_wait_ms <= LONGEST_WAIT_MS, "{seen:?}");
    let most = check_worker_slots(&all, |w| {
        if w == FAN_OUT_WORKER {
            POOL_SLOTS
        } else {
            WORKER_SLOTS as usize
        }
    })
    .unwrap_or_else(|e| panic!("worker slots:\n  {}", e.join("\n  ")));

    // Who ran the work: with one coordinator per worker, workers of every
    // coordinator ran tasks that coordinator 0 made ready.
    let mut by_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for e in of_kind(&all, EventKind::TaskAssigned) {
        *by_worker.entry(e.worker_id.as_str()).or_default() += 1;
    }
    if !kill {
        for c in 0..3 {
            let ran: usize = streams
                .iter()
                .filter(|(_, on)| **on == c)
                .map(|(w, _)| by_worker.get(w.as_str()).copied().unwrap_or(0))
                .sum();
            assert!(
                ran > 0,
                "coordinator {c}'s workers ran nothing: {by_worker:?}"
            );
        }
    }
    for id in &moved {
        // The moved workers still ran work somewhere; not asserted: they may
        // have had little left.
        eprintln!(
            "moved {id}: {} assignments",
            by_worker.get(id.as_str()).unwrap_or(&0)
        );
    }
    let mut expiries: BTreeMap<&str, usize> = BTreeMap::new();
    for e in of_kind(&all, EventKind::TaskLeaseExpired) {
        *expiries.entry(e.worker_id.as_str()).or_default() += 1;
    }
    eprintln!(
        "fleet (kill: {kill}, kills: {kills}): {MIGRATIONS} migrations of {} tasks in {elapsed:.1?}; {} events; \
         capacity {seen:?}; ListPools {sampled:?}; most leases on one worker {most}; lease expiries {:?}; \
         assignments per worker {by_worker:?}",
        WIDTH + 2,
        all.len(),
        expiries,
    );
}

/// Per migration of the fleet: each stage started exactly once (I2), and
/// every task succeeded exactly once (nothing lost, nothing run twice to
/// success).
fn check_fleet_log(all: &[Event], ids: &[i64]) {
    let mut starts: HashMap<(i64, Option<u32>), usize> = HashMap::new();
    for e in of_kind(all, EventKind::StageStarted) {
        *starts.entry((e.migration_id, e.stage_index)).or_default() += 1;
    }
    let mut successes: HashMap<i64, usize> = HashMap::new();
    for e in of_kind(all, EventKind::TaskSucceeded) {
        *successes.entry(e.task_id).or_default() += 1;
    }
    for id in ids {
        for k in 0..3 {
            assert_eq!(
                starts.get(&(*id, Some(k))),
                Some(&1),
                "migration {id}: stage {k} started once"
            );
        }
    }
    assert_eq!(starts.len(), ids.len() * 3, "no other stage started");
    assert_eq!(
        successes.len(),
        ids.len() * (WIDTH + 2),
        "every task succeeded"
    );
    let twice: Vec<_> = successes.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks that succeeded twice: {twice:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_coordinators_racing_for_one_free_slot_admit_one_migration() {
    const ROUNDS: usize = 10;
    let mut fleet = Fleet::start(2, &FAST).await;
    let (a, b) = (fleet.client(0).await, fleet.client(1).await);
    fleet.add_worker("w1", 2, &[0, 1]);
    fleet.wait_for_streams(&[0, 1], WAIT).await;
    let create_pool = CreatePoolRequest {
        name: "race".into(),
        slots: 1,
    };
    a.admin.clone().create_pool(create_pool).await.unwrap();
    let p = plan(
        "short",
        vec![stage("s", vec![task("sleep", json!({"ms": 300}))])],
    );
    let req = |subject: String| CreateMigrationRequest {
        pool: "race".into(),
        ..create_inline(p.clone(), &subject)
    };
    let sampler = PoolSampler::start(vec![a.clone(), b.clone()], "race");

    let mut ids = Vec::new();
    for round in 0..ROUNDS {
        let (via_a, via_b) = tokio::join!(
            a.create(req(format!("race/{round}/a"))),
            b.create(req(format!("race/{round}/b")))
        );
        let (via_a, via_b) = (via_a.unwrap(), via_b.unwrap());
        let states = [via_a.state(), via_b.state()];
        let running = states
            .iter()
            .filter(|s| **s == MigrationState::Running)
            .count();
        assert_eq!(running, 1, "round {round}: one admitted, {states:?}");
        assert!(states.contains(&MigrationState::Queued), "{states:?}");
        for client in [&a, &b] {
            let pool = client.pool("race").await.unwrap();
            assert!(pool.running <= 1, "round {round}: {pool:?}");
        }
        for m in [via_a.id, via_b.id] {
            let (m, _) = a.finish_and_check(m, WAIT).await;
            assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
            ids.push(m.id);
        }
    }
    let sampled = sampler.finish().await;
    assert_eq!(sampled.max_running, 1, "ListPools: {sampled:?}");
    assert!(
        sampled.full_with_queue > 0,
        "never saw one wait: {sampled:?}"
    );

    let mut all = Vec::new();
    for id in &ids {
        all.extend(b.events(*id).await.unwrap());
    }
    let seen = check_capacity(&all, 1, CommitOrder::Concurrent)
        .unwrap_or_else(|e| panic!("capacity:\n  {}", e.join("\n  ")));
    assert_eq!(
        (seen.max_running, seen.admissions),
        (1, 2 * ROUNDS),
        "{seen:?}"
    );
    assert!(seen.longest_wait_ms <= LONGEST_WAIT_MS, "{seen:?}");
    eprintln!("race: {ROUNDS} rounds; capacity {seen:?}; ListPools {sampled:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_through_one_coordinator_stops_a_worker_streaming_from_another() {
    const HOLD: &str = "fake.hold";
    let mut fleet = Fleet::start(2, &FAST).await;
    let (a, b) = (fleet.client(0).await, fleet.client(1).await);
    fleet.add_worker("on-b", 1, &[1]);
    fleet.wait_for_streams(&[1], WAIT).await;
    let mut raw = FakeWorker::subscribe(&fleet.url(1), "raw-on-b", &[HOLD], 1).await;
    let marker = fleet.dir().join("canceled");
    let p = plan(
        "long",
        vec![stage(
            "s",
            vec![
                task("sleep", json!({"ms": 120_000, "cancel_marker": marker})),
                task(HOLD, json!({})),
            ],
        )],
    );
    let m = a.create(create_inline(p, "cancel/across")).await.unwrap();
    let held = raw.next_assignment(WAIT).await.lease.unwrap();
    let assigned = wait_for("both tasks assigned", WAIT, async || {
        let events = a.events(m.id).await.ok()?;
        let assigned: Vec<Event> = of_kind(&events, EventKind::TaskAssigned)
            .into_iter()
            .cloned()
            .collect();
        (assigned.len() == 2).then_some(assigned)
    })
    .await;
    let mut workers: Vec<&str> = assigned.iter().map(|e| e.worker_id.as_str()).collect();
    workers.sort_unstable();
    assert_eq!(workers, ["on-b", "raw-on-b"]);
    // Let the sleep handler start: its progress reaches B's heartbeats.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = Instant::now();
    let canceled = a.cancel(m.id, "stop it").await.unwrap();
    assert_eq!(canceled.state(), MigrationState::Canceled);
    // A raw worker reads its stream only: this notice came from B, which
    // learned of A's commit by NOTIFY.
    let notice = raw.wait_for_cancel(held, Duration::from_secs(5)).await;
    let notified_after = asked.elapsed();
    wait_for(
        "the sleep's cancel marker",
        Duration::from_secs(5),
        async || marker.exists().then_some(()),
    )
    .await;
    let marker_after = asked.elapsed();
    for client in [&a, &b] {
        let now = client.get_migration(m.id).await.unwrap();
        assert_eq!(now.state(), MigrationState::Canceled);
        assert_eq!(now.reason, "stop it");
    }
    let (_, events) = b.check(m.id).await;
    let end = events
        .iter()
        .position(|e| e.kind() == EventKind::MigrationCanceled)
        .expect("MIGRATION_CANCELED");
    let later: Vec<String> = events[end..]
        .iter()
        .filter(|e| e.kind() == EventKind::TaskAssigned)
        .map(describe_event)
        .collect();
    assert!(later.is_empty(), "assigned after the cancel: {later:?}");
    let worker = &fleet.workers[0];
    wait_for("the worker to log the cancel", WAIT, async || {
        (worker.canceled_leases().len() == 1).then_some(())
    })
    .await;
    let logs = worker.logs();
    let told_by = if logs.contains("coordinator canceled a task") {
        "its stream"
    } else {
        "a heartbeat answer"
    };
    eprintln!(
        "cancel via A: raw worker on B notified after {notified_after:?} ({}), marker after {marker_after:?}, \
         worker process told by {told_by}",
        notice.reason
    );
}
