//! What the store contract tests share: a fresh store on either backend,
//! small plans, and `on_both_backends!`, which turns each case into one test
//! per backend. Every test file that uses it includes `mod support;` and
//! `use support::contract::*;`; not every file uses every helper.
#![allow(dead_code)]

use std::sync::Arc;

use serde_json::json;
use stagecoach_coordinator::domain::{
    Assignment, Completion, EventKind, LeaseSecret, LeaseToken, NewMigration, PlanSpec,
};
use stagecoach_coordinator::store::{Created, Limits, PostgresStore, SqliteStore, Store};

/// The backend a contract case runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A store under test and what keeps its database alive.
pub struct Db {
    pub store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

pub async fn store_with(backend: Backend, limits: Limits) -> Db {
    let db = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("t.db").display());
            let store = SqliteStore::open(&url, limits).await.unwrap();
            Db {
                store: Arc::new(store),
                _dir: Some(dir),
            }
        }
        Backend::Postgres => {
            let url = super::postgres::fresh_database();
            let store = PostgresStore::open(&url, limits).await.unwrap();
            Db {
                store: Arc::new(store),
                _dir: None,
            }
        }
    };
    db.store.ensure_pool("default", 10).await.unwrap();
    db
}

pub const LIMITS: Limits = Limits {
    lease_ms: 60_000,
    heartbeat_interval_ms: 1_000,
    max_reassignments: 3,
};

pub async fn store(backend: Backend) -> Db {
    store_with(backend, LIMITS).await
}

pub fn plan(json: serde_json::Value) -> PlanSpec {
    let p = PlanSpec::from_json(&json.to_string()).unwrap();
    p.validate("", 2_000).unwrap();
    p
}

pub fn two_stage() -> PlanSpec {
    plan(json!({"name": "p", "stages": [
        {"name": "a", "tasks": [{"kind": "noop"}, {"kind": "noop"}]},
        {"name": "b", "tasks": [{"kind": "noop"}]},
    ]}))
}

/// A migration of `n` tasks in stage "a", then one in "b", created, with
/// every task of "a" leased to `W` (in task order).
pub async fn first_stage_claimed(s: &dyn Store, n: usize) -> (Created, Vec<Assignment>) {
    let tasks: Vec<_> = (0..n)
        .map(|i| json!({"kind": "noop", "payload": {"i": i}}))
        .collect();
    let p = plan(json!({"name": "p", "stages": [
        {"name": "a", "tasks": tasks}, {"name": "b", "tasks": [{"kind": "noop"}]}]}));
    let (c, _) = s.create_migration(&new(p, "s")).await.unwrap();
    let a = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(a.len(), n);
    (c, a)
}

/// A migration of `n` no-op tasks in one stage "a", created.
pub async fn one_stage_of_noops(s: &dyn Store, n: usize) -> Created {
    let tasks = vec![json!({"kind": "noop"}); n];
    let p = plan(json!({"name": "p", "stages": [{"name": "a", "tasks": tasks}]}));
    s.create_migration(&new(p, "s")).await.unwrap().0
}

/// Completes `leases` (held by `W`) in one `report_many` batch, in the
/// order given, and asserts each was recorded.
pub async fn complete_as_one_batch<'a>(
    s: &dyn Store,
    leases: impl IntoIterator<Item = &'a Assignment>,
) {
    use stagecoach_coordinator::store::Report;
    let batch: Vec<(String, Report)> = leases
        .into_iter()
        .map(|a| (W.to_string(), Report::Complete(done(a))))
        .collect();
    let results = s.report_many(&batch).await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

pub fn new(plan: PlanSpec, subject: &str) -> NewMigration {
    NewMigration {
        plan,
        subject: subject.into(),
        parameters: json!({}),
        pool: "default".into(),
        deadline_ms: None,
        idempotency_key: None,
        created_by: None,
    }
}

/// A plain completion of the assignment's lease, with its secret.
pub fn done(a: &Assignment) -> Completion {
    done_as(a.lease, a.secret)
}

/// A plain completion naming `lease` and `secret`, whatever they are.
pub fn done_as(lease: LeaseToken, secret: LeaseSecret) -> Completion {
    Completion {
        lease,
        secret,
        output: json!({}),
        add_tasks: vec![],
    }
}

pub const W: &str = "w1";

pub fn kinds(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

pub async fn kinds_of(s: &dyn Store, id: i64) -> Vec<EventKind> {
    s.list_events(id, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect()
}

/// Generates one `#[tokio::test]` per case and backend. A case left out of
/// the list is dead code, which clippy (`-D warnings`) refuses.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Backend::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Backend::Postgres).await
            })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;
