//! Pool capacity (I3), judged from the merged event log of every migration
//! (on both backends; see `stagecoach_tests::capacity` for what the log
//! proves when PostgreSQL commits transactions concurrently):
//!
//! - with 3 slots, 13 one-task migrations and 3 one-slot workers, at most 3
//!   migrations ever run at once, and exactly 3 do at some point;
//! - admission is immediate: on SQLite, whenever a migration is queued while
//!   a slot is free, the next event in the log is the admission of the
//!   oldest queued migration (only the admitted migration's own
//!   STAGE_STARTED may come between two admissions of one pass) — so a slot
//!   freed by a finishing migration is refilled in the same transaction; on
//!   PostgreSQL every such wait ends with an admission, within
//!   [`LONGEST_WAIT_MS`];
//! - while the pool is paused nothing is admitted: the running migrations
//!   finish (ListPools: running drops to 0) while others stay queued, and no
//!   MIGRATION_ADMITTED is logged; ResumePool fills every free slot at once
//!   (its answer already shows them running) and all migrations succeed;
//! - no worker holds more leases than its one slot (I12).

use std::time::Duration;

use serde_json::json;
use stagecoach_proto::v1::{
    EventKind, Migration, MigrationState, PausePoolRequest, ResumePoolRequest,
};
use stagecoach_tests::plans::{create_inline, plan, stage, task};
use stagecoach_tests::{
    Backend, Client, Cluster, check_capacity_paused, check_worker_slots, is_terminal,
    on_both_backends, wait_for,
};

on_both_backends!(a_pool_runs_at_most_its_slots_and_refills_them_at_once);

const SLOTS: usize = 3;
const WAIT: Duration = Duration::from_secs(120);
/// How long (database time) a migration may be seen waiting beside a free
/// slot on PostgreSQL: one transaction, which finishes a migration and
/// refills its slot, waiting for the pool's row lock at worst. Generous, for
/// loaded machines; it is 0 to a few ms when idle.
const LONGEST_WAIT_MS: i64 = 2_000;

async fn create(client: &Client, n: usize) -> Migration {
    let p = plan(
        "one-sleep",
        vec![stage("s", vec![task("sleep", json!({"ms": 700}))])],
    );
    client
        .create(create_inline(p, &format!("capacity/{n}")))
        .await
        .expect("create")
}

async fn last_event_id(client: &Client) -> i64 {
    let events = client.all_events().await.expect("all events");
    events.last().map_or(0, |e| e.id)
}

async fn a_pool_runs_at_most_its_slots_and_refills_them_at_once(backend: Backend) {
    let cluster = Cluster::start_fast(backend, &["--default-pool-slots", "3"], 3, 1).await;
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(create(&client, n).await.id);
    }
    // Pause once a few have finished, so admissions after finishes happened.
    wait_for("4 finished migrations", WAIT, async || {
        let all = client.list_migrations().await.ok()?;
        (all.iter().filter(|m| is_terminal(m.state())).count() >= 4).then_some(())
    })
    .await;

    let before_pause = last_event_id(&client).await;
    let paused = client
        .admin
        .clone()
        .pause_pool(PausePoolRequest {
            name: "default".into(),
        })
        .await
        .expect("PausePool")
        .into_inner()
        .pool
        .unwrap();
    assert!(paused.paused);
    let after_pause = last_event_id(&client).await;
    for n in 10..13 {
        let m = create(&client, n).await;
        assert_eq!(m.state(), MigrationState::Queued, "created while paused");
        ids.push(m.id);
    }
    let drained = wait_for("running to drop to 0 while paused", WAIT, async || {
        client.pool("default").await.ok().filter(|p| p.running == 0)
    })
    .await;
    let unfinished = client
        .list_migrations()
        .await
        .unwrap()
        .iter()
        .filter(|m| !is_terminal(m.state()))
        .count();
    assert!(drained.queued >= 3, "{drained:?}");
    assert_eq!(drained.queued as usize, unfinished, "{drained:?}");
    let before_resume = last_event_id(&client).await;
    let admitted_while_paused: Vec<_> = client
        .all_events()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind() == EventKind::MigrationAdmitted)
        .filter(|e| e.id > after_pause && e.id <= before_resume)
        .collect();
    assert!(
        admitted_while_paused.is_empty(),
        "admitted while paused: {admitted_while_paused:?}"
    );

    let resumed = client
        .admin
        .clone()
        .resume_pool(ResumePoolRequest {
            name: "default".into(),
        })
        .await
        .expect("ResumePool")
        .into_inner()
        .pool
        .unwrap();
    assert!(!resumed.paused);
    let filled = drained.queued.min(SLOTS as u32);
    assert_eq!(
        (resumed.running, resumed.queued),
        (filled, drained.queued - filled),
        "ResumePool fills every free slot in one pass"
    );

    for id in &ids {
        let (m, _) = client.finish_and_check(*id, WAIT).await;
        assert_eq!(m.state(), MigrationState::Succeeded, "{}", m.reason);
    }
    let all = client.all_events().await.unwrap();
    let paused_window =
        |e: &stagecoach_proto::v1::Event| e.id > before_pause && e.id <= before_resume;
    let seen = check_capacity_paused(&all, SLOTS, backend.commit_order(), paused_window)
        .unwrap_or_else(|errors| {
            panic!("capacity:\n  {}", errors.join("\n  "));
        });
    assert_eq!(seen.max_running, SLOTS, "{seen:?}");
    assert!(seen.longest_wait_ms <= LONGEST_WAIT_MS, "{seen:?}");
    assert_eq!(seen.admissions, ids.len(), "{seen:?}");
    // Every admission outside the pause came the moment a slot was free.
    assert!(
        seen.prompt_admissions >= ids.len() - filled as usize,
        "{seen:?}"
    );
    let most = check_worker_slots(&all, |_| 1).unwrap_or_else(|errors| {
        panic!("worker slots:\n  {}", errors.join("\n  "));
    });
    assert_eq!(most, 1);
    let pool = client.pool("default").await.unwrap();
    assert_eq!((pool.running, pool.queued), (0, 0), "{pool:?}");
}
