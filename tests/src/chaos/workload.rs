//! The migrations the harness keeps creating while faults happen, one
//! plan shape at a time, and the outcome each shape implies.
//!
//! Migration `n` draws its shape and sizes from its own RNG (seeded from
//! the run's seed and `n`), so the workload replays from the seed whatever
//! the faults did to the timing. Each migration is driven by a task of its
//! own: it creates the migration (with an idempotency key, so a create whose
//! answer was lost to a fault can be sent again, to any coordinator), and
//! for some shapes acts later as a client would (cancel, fix and retry).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use stagecoach_proto::v1::{CreateMigrationRequest, Migration, MigrationState, Plan};
use tonic::{Code, Status};

use crate::client::Client;
use crate::plans::{StageExt, create_inline, plan, retry, stage, task};

/// How long the driver of one migration keeps trying a call through faults.
const CALL_PATIENCE: Duration = Duration::from_secs(90);

/// One call's bound: a coordinator whose store is black-holed may hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The plan shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shape {
    /// Many tasks in one parallel stage, then a closing stage.
    FanOut,
    /// Several stages, one of them serial.
    Serial,
    /// A task that fails (retryably) until a file appears, then succeeds.
    RetryThenSucceed,
    /// A task that fails for good.
    FailForGood,
    /// Sleeps with a deadline that may or may not come first.
    Deadline,
    /// Long sleeps, canceled by a client.
    Cancel,
    /// Fails for good, then the client fixes the cause and retries it.
    ClientRetry,
}

const SHAPES: [Shape; 7] = [
    Shape::FanOut,
    Shape::Serial,
    Shape::RetryThenSucceed,
    Shape::FailForGood,
    Shape::Deadline,
    Shape::Cancel,
    Shape::ClientRetry,
];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::FanOut => "fan-out",
            Shape::Serial => "serial",
            Shape::RetryThenSucceed => "retry-then-succeed",
            Shape::FailForGood => "fail-for-good",
            Shape::Deadline => "deadline",
            Shape::Cancel => "cancel",
            Shape::ClientRetry => "client-retry",
        }
    }
}

/// The outcome a migration's plan and the client's actions imply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Succeeded,
    Failed,
    /// The cancel was accepted.
    Canceled,
    /// The cancel's answer was lost or refused: canceled or succeeded.
    CanceledOrSucceeded,
    /// Failed with reason "deadline exceeded", or succeeded before it.
    DeadlineOrSucceeded,
}

impl Expect {
    /// Whether `m` ended as expected.
    pub fn accepts(self, m: &Migration) -> bool {
        let state = m.state();
        match self {
            Expect::Succeeded => state == MigrationState::Succeeded,
            Expect::Failed => state == MigrationState::Failed,
            Expect::Canceled => state == MigrationState::Canceled,
            Expect::CanceledOrSucceeded => {
                matches!(state, MigrationState::Canceled | MigrationState::Succeeded)
            }
            Expect::DeadlineOrSucceeded => {
                state == MigrationState::Succeeded
                    || (state == MigrationState::Failed && m.reason == "deadline exceeded")
            }
        }
    }
}

/// A migration the workload created, and what it should come to.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub n: u64,
    pub id: i64,
    pub shape: Shape,
    pub expect: Expect,
    /// The most attempts any of its stages allows.
    pub max_attempts: u32,
}

/// The harness's clients of every coordinator, and a count of the calls
/// they sent again after an answer a fault may cause (by RPC and code), so
/// the report shows every `INTERNAL` or `UNAVAILABLE` the faults drew.
#[derive(Debug, Clone)]
pub struct Calls {
    clients: Vec<Client>,
    retried: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

impl Calls {
    pub fn new(clients: Vec<Client>) -> Calls {
        Calls {
            clients,
            retried: Arc::default(),
        }
    }

    /// Calls sent again, by RPC and the code that made the harness retry.
    pub fn retried(&self) -> BTreeMap<(String, String), u64> {
        self.retried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self, what: &str, code: Code) {
        *self
            .retried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((what.to_string(), format!("{code:?}")))
            .or_default() += 1;
    }
}

/// What the driver of migration `n` ended with.
pub type Driven = Result<Tracked, String>;

/// The RNG of migration `n` of a run with `seed`.
fn migration_rng(seed: u64, n: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ (n + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Creates migration `n` and plays its client's part; returns it with its
/// expected outcome, or why the harness could not drive it.
pub async fn drive(seed: u64, n: u64, calls: Calls, markers: PathBuf) -> Driven {
    let mut rng = migration_rng(seed, n);
    let shape = SHAPES[rng.random_range(0..SHAPES.len())];
    let marker = markers.join(format!("m-{n}"));
    let (plan, max_attempts) = plan_of(shape, &mut rng, &marker);
    let mut req = create_inline(plan, &format!("chaos/{n}"));
    req.idempotency_key = format!("chaos-{seed}-{n}");
    // Counted from each send: a create refused or lost to a fault is sent
    // again later, and a deadline already past would be refused (the
    // idempotency key finds a create that did commit, whatever its deadline).
    let deadline_in =
        (shape == Shape::Deadline).then(|| Duration::from_millis(rng.random_range(2_000..10_000)));
    let m = create(&calls, n, req, deadline_in).await?;
    let mut tracked = Tracked {
        n,
        id: m.id,
        shape,
        expect: Expect::Succeeded,
        max_attempts,
    };
    match shape {
        Shape::FanOut | Shape::Serial => {}
        Shape::FailForGood => tracked.expect = Expect::Failed,
        Shape::Deadline => tracked.expect = Expect::DeadlineOrSucceeded,
        Shape::RetryThenSucceed => {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_500))).await;
            write_marker(&marker).await?;
        }
        Shape::Cancel => {
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_500))).await;
            let canceled = call(&calls, n, "CancelMigration", |c| async move {
                c.cancel(m.id, "chaos: canceled by the client").await
            })
            .await;
            tracked.expect = match canceled {
                Ok(_) => Expect::Canceled,
                // Refused: it finished first (or an earlier try, whose
                // answer was lost, canceled it).
                Err(s) if s.code() == Code::FailedPrecondition => Expect::CanceledOrSucceeded,
                Err(s) => return Err(format!("migration {} (n={n}): cancel: {s}", m.id)),
            };
        }
        Shape::ClientRetry => {
            wait_failed(&calls, n, m.id).await?;
            write_marker(&marker).await?;
            let retried = call(&calls, n, "RetryMigration", |c| async move {
                c.retry(m.id).await
            })
            .await;
            match retried {
                Ok(_) => {}
                // An earlier try whose answer was lost may have retried it.
                Err(s) if s.code() == Code::FailedPrecondition => {
                    let now = call(&calls, n, "GetMigration", |c| async move {
                        c.get_migration(m.id).await
                    })
                    .await
                    .map_err(|s| format!("migration {} (n={n}): {s}", m.id))?;
                    if now.state() == MigrationState::Failed {
                        return Err(format!(
                            "migration {} (n={n}): RetryMigration refused on a failed migration: {s}",
                            m.id
                        ));
                    }
                }
                Err(s) => return Err(format!("migration {} (n={n}): retry: {s}", m.id)),
            }
        }
    }
    Ok(tracked)
}

/// The plan of a shape, and the most attempts any of its stages allows.
fn plan_of(shape: Shape, rng: &mut StdRng, marker: &Path) -> (Plan, u32) {
    let name = shape.name();
    let marker = marker.display().to_string();
    let sleep = |rng: &mut StdRng, lo, hi| task("sleep", json!({"ms": rng.random_range(lo..hi)}));
    match shape {
        Shape::FanOut => {
            let tasks = (0..rng.random_range(4..16))
                .map(|_| {
                    if rng.random_bool(0.5) {
                        task("noop", json!({}))
                    } else {
                        sleep(rng, 20, 800)
                    }
                })
                .collect();
            let p = plan(
                name,
                vec![
                    stage("fan-out", tasks).with_retry(retry(3, 100, 1_000, 0)),
                    stage("close", vec![task("noop", json!({}))]),
                ],
            );
            (p, 3)
        }
        Shape::Serial => {
            let serial = (0..rng.random_range(2..5))
                .map(|_| sleep(rng, 50, 500))
                .collect();
            let p = plan(
                name,
                vec![
                    stage("first", vec![sleep(rng, 50, 300)]),
                    stage("one-by-one", serial).serial(),
                    stage("last", vec![task("noop", json!({})); 2]),
                ],
            );
            (p, 3)
        }
        Shape::RetryThenSucceed => {
            let flaky = task(
                "fail",
                json!({"retryable": true, "unless_file": marker, "message": "not yet"}),
            );
            let p = plan(
                name,
                vec![
                    stage("flaky", vec![flaky, task("noop", json!({}))])
                        .with_retry(retry(100, 100, 400, 0)),
                ],
            );
            (p, 100)
        }
        Shape::FailForGood => {
            let retryable = rng.random_bool(0.5);
            let p = plan(
                name,
                vec![
                    stage("ok", vec![task("noop", json!({}))]),
                    stage(
                        "broken",
                        vec![task(
                            "fail",
                            json!({"retryable": retryable, "message": "broken for good"}),
                        )],
                    )
                    .with_retry(retry(3, 50, 200, 0)),
                ],
            );
            (p, 3)
        }
        Shape::Deadline => {
            let tasks = (0..rng.random_range(1..4))
                .map(|_| sleep(rng, 300, 2_500))
                .collect();
            let p = plan(
                name,
                vec![
                    stage("slow", tasks),
                    stage("slower", vec![sleep(rng, 300, 2_500)]),
                ],
            );
            (p, 3)
        }
        Shape::Cancel => {
            let p = plan(
                name,
                vec![
                    stage(
                        "long",
                        vec![sleep(rng, 2_000, 5_000), sleep(rng, 2_000, 5_000)],
                    ),
                    stage("longer", vec![sleep(rng, 2_000, 5_000)]),
                ],
            );
            (p, 3)
        }
        Shape::ClientRetry => {
            let broken = task(
                "fail",
                json!({"unless_file": marker, "message": "needs a fix"}),
            );
            let p = plan(
                name,
                vec![stage("fixable", vec![broken, task("noop", json!({}))])],
            );
            (p, 3)
        }
    }
}

/// Creates the migration, trying each coordinator in turn through faults;
/// with a deadline `deadline_in` after each send. A send that spent longer
/// than that in flight (a coordinator restarting, a store black-holed) is
/// refused for a deadline already past, rightly: it is sent again, a few
/// times, with a new one.
async fn create(
    calls: &Calls,
    n: u64,
    req: CreateMigrationRequest,
    deadline_in: Option<Duration>,
) -> Result<Migration, String> {
    let mut late = 0;
    loop {
        let created = call(calls, n, "CreateMigration", |c| {
            let mut req = req.clone();
            req.deadline = deadline_in.map(|d| prost_types::Timestamp::from(SystemTime::now() + d));
            async move { c.create(req).await }
        })
        .await;
        match created {
            Err(s)
                if deadline_in.is_some()
                    && s.code() == Code::InvalidArgument
                    && s.message().starts_with("deadline:")
                    && late < 5 =>
            {
                late += 1;
                calls.count("CreateMigration", s.code());
            }
            other => return other.map_err(|s| format!("migration n={n}: create: {s}")),
        }
    }
}

/// Waits until the migration is finished, quietly giving up after a while
/// (the checks at the end judge it): the workload keeps a bounded number
/// of migrations unfinished, so a slowed cluster is not buried under a
/// queue it can never drain.
pub async fn wait_finished(calls: &Calls, n: u64, id: i64) {
    let deadline = tokio::time::Instant::now() + 2 * CALL_PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let m = call(calls, n, "GetMigration", |c| async move {
            c.get_migration(id).await
        })
        .await;
        if m.is_ok_and(|m| crate::client::is_terminal(m.state())) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the migration failed (the first run of a client-retry
/// plan).
async fn wait_failed(calls: &Calls, n: u64, id: i64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + CALL_PATIENCE;
    loop {
        let m = call(calls, n, "GetMigration", |c| async move {
            c.get_migration(id).await
        })
        .await
        .map_err(|s| format!("migration {id} (n={n}): {s}"))?;
        match m.state() {
            MigrationState::Failed => return Ok(()),
            MigrationState::Succeeded | MigrationState::Canceled => {
                return Err(format!(
                    "migration {id} (n={n}): its task fails until the client fixes it, yet it ended {:?} ({:?})",
                    m.state(),
                    m.reason
                ));
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "migration {id} (n={n}): not failed after {CALL_PATIENCE:?} though its task fails for good"
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn write_marker(marker: &Path) -> Result<(), String> {
    tokio::fs::write(marker, b"fixed")
        .await
        .map_err(|e| format!("writing {}: {e}", marker.display()))
}

/// Sends a call to the coordinators in turn (starting with one chosen by
/// `n`) until one answers with something other than a transient error, for
/// at most [`CALL_PATIENCE`]. Only idempotent calls go through here.
async fn call<T, F, Fut>(calls: &Calls, n: u64, what: &str, send: F) -> Result<T, Status>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = tokio::time::Instant::now() + CALL_PATIENCE;
    let mut last = Status::unavailable(format!("{what} was never sent"));
    for i in (n as usize).. {
        let client = calls.clients[i % calls.clients.len()].clone();
        match tokio::time::timeout(CALL_TIMEOUT, send(client)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(s)) if !transient(&s) => return Err(s),
            Ok(Err(s)) => last = s,
            Err(_) => {
                last = Status::deadline_exceeded(format!("{what}: no answer in {CALL_TIMEOUT:?}"))
            }
        }
        calls.count(what, last.code());
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Status::unavailable(format!(
        "{what}: no coordinator answered for {CALL_PATIENCE:?}; last: {last}"
    )))
}

/// Codes a fault can cause: the call may or may not have taken effect.
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(state: MigrationState, reason: &str) -> Migration {
        Migration {
            state: state as i32,
            reason: reason.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn an_outcome_other_than_the_plan_implies_is_refused() {
        use MigrationState::*;
        let deadline = ended(Failed, "deadline exceeded");
        let broken = ended(Failed, "task 3 failed: broken for good");
        assert!(Expect::DeadlineOrSucceeded.accepts(&deadline));
        assert!(Expect::DeadlineOrSucceeded.accepts(&ended(Succeeded, "")));
        assert!(!Expect::DeadlineOrSucceeded.accepts(&broken));
        assert!(!Expect::Succeeded.accepts(&deadline));
        assert!(Expect::Failed.accepts(&broken));
        assert!(!Expect::Failed.accepts(&ended(Canceled, "")));
        assert!(!Expect::Canceled.accepts(&ended(Succeeded, "")));
        assert!(Expect::CanceledOrSucceeded.accepts(&ended(Succeeded, "")));
        assert!(!Expect::CanceledOrSucceeded.accepts(&ended(Running, "")));
    }

    #[test]
    fn the_workload_replays_from_the_seed() {
        let draw = |seed| {
            (0..20)
                .map(|n| {
                    let mut rng = migration_rng(seed, n);
                    let shape = SHAPES[rng.random_range(0..SHAPES.len())];
                    plan_of(shape, &mut rng, Path::new("/m"))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
