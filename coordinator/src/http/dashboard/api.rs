//! The dashboard's JSON: its own serde types, converted here from the
//! domain's, so the page's contract does not change when a domain type does.
//!
//! | route | answers |
//! |---|---|
//! | `GET /api/migrations?state=&subject=&pool=&page_size=&page_token=` | a page of migrations, newest first, and the next page's token |
//! | `GET /api/migrations/{id}` | one migration: stages, their spans from the log, leased tasks, the log's tail |
//! | `GET /api/pools` | pools with slots in use and queue depth |
//! | `GET /api/workers` | connected workers with their leases |
//!
//! Errors are `{"error": …, "field": …}` with the status the gRPC code
//! would map to (`400`, `404`, `503`, `500`).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::Dashboard;
use super::timeline::Span;
use crate::domain::{
    Event, LeaseToken, Migration, MigrationFilter, MigrationState, Pool, StageProgress,
};
use crate::engine::WorkerView;
use crate::error::Error;
use crate::store::LeasedTask;

/// Migrations per page unless `page_size` says otherwise.
const DEFAULT_PAGE: u32 = 50;
/// The largest `page_size`.
const MAX_PAGE: u32 = 500;
/// Leased tasks shown for one migration.
const MAX_LEASED: u32 = 200;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status,
            field: field.map(String::from),
            message: message.into(),
        }
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some(field), message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) | Error::LeaseNotHeld(_) | Error::FailedPrecondition(_) => {
                StatusCode::CONFLICT
            }
            Error::ResourceExhausted(_) | Error::ShuttingDown | Error::NotRecorded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) => {
                tracing::error!(error = %e, "dashboard read failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        match e {
            Error::InvalidArgument { field, message } => Self {
                status,
                field: Some(field),
                message,
            },
            e => Self::new(status, None, e.to_string()),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            field: self.field,
        };
        fresh((self.status, Json(body)))
    }
}

/// A JSON answer no cache keeps: it is a snapshot of live state.
fn fresh(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

type Answer = Result<Response, ApiError>;

// --- migrations ----------------------------------------------------------

/// `GET /api/migrations`'s query; every field optional, parsed by hand so
/// a bad value is named.
#[derive(Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    subject: Option<String>,
    pool: Option<String>,
    page_size: Option<String>,
    page_token: Option<String>,
}

#[derive(Serialize)]
struct MigrationPage {
    migrations: Vec<MigrationJson>,
    /// Pass as `page_token` for the next (older) page; empty on the last.
    next_page_token: String,
}

#[derive(Serialize)]
struct MigrationJson {
    id: i64,
    plan_name: String,
    plan_version: u32,
    subject: String,
    pool: String,
    state: &'static str,
    reason: String,
    created_at_ms: i64,
    admitted_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    deadline_ms: Option<i64>,
    /// Finished tasks (succeeded, failed or canceled) of all stages.
    tasks_done: u64,
    tasks_total: u64,
    stages: Vec<StageJson>,
}

#[derive(Serialize)]
struct StageJson {
    index: u32,
    name: String,
    state: &'static str,
    total: u32,
    succeeded: u32,
    failed: u32,
    canceled: u32,
    running: u32,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
}

impl From<&StageProgress> for StageJson {
    fn from(s: &StageProgress) -> Self {
        Self {
            index: s.index,
            name: s.name.clone(),
            state: s.state.as_str(),
            total: s.total,
            succeeded: s.succeeded,
            failed: s.failed,
            canceled: s.canceled,
            running: s.running,
            started_at_ms: s.started_at_ms,
            finished_at_ms: s.finished_at_ms,
        }
    }
}

impl From<&Migration> for MigrationJson {
    fn from(m: &Migration) -> Self {
        let sum = |f: fn(&StageProgress) -> u32| m.stages.iter().map(|s| f(s) as u64).sum();
        Self {
            id: m.id,
            plan_name: m.plan_name.clone(),
            plan_version: m.plan_version,
            subject: m.subject.clone(),
            pool: m.pool.clone(),
            state: m.state.as_str(),
            reason: m.reason.clone(),
            created_at_ms: m.created_at_ms,
            admitted_at_ms: m.admitted_at_ms,
            finished_at_ms: m.finished_at_ms,
            deadline_ms: m.deadline_ms,
            tasks_done: sum(|s| s.succeeded + s.failed + s.canceled),
            tasks_total: sum(|s| s.total),
            stages: m.stages.iter().map(StageJson::from).collect(),
        }
    }
}

pub async fn list_migrations(State(d): State<Dashboard>, Query(q): Query<ListQuery>) -> Answer {
    let filter = list_filter(q)?;
    let page = d.core.list_migrations(&filter).await?;
    let next_page_token = match page.last() {
        Some(last) if page.len() == filter.limit as usize => last.id.to_string(),
        _ => String::new(),
    };
    Ok(fresh(Json(MigrationPage {
        migrations: page.iter().map(MigrationJson::from).collect(),
        next_page_token,
    })))
}

fn list_filter(q: ListQuery) -> Result<MigrationFilter, ApiError> {
    let given = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let state = match given(q.state) {
        None => None,
        Some(s) => Some(MigrationState::parse(&s).ok_or_else(|| {
            ApiError::invalid(
                "state",
                format!(
                    "{s:?} is not a migration state; use queued, running, succeeded, failed or canceled"
                ),
            )
        })?),
    };
    let limit = match given(q.page_size) {
        None => DEFAULT_PAGE,
        Some(n) => match n.parse::<u32>() {
            Ok(n @ 1..=MAX_PAGE) => n,
            _ => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("{n:?} is not a page size; use 1-{MAX_PAGE}"),
                ));
            }
        },
    };
    let before_id = match given(q.page_token) {
        None => None,
        Some(t) => Some(t.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
            ApiError::invalid(
                "page_token",
                "not a token this server issued; pass next_page_token unchanged",
            )
        })?),
    };
    Ok(MigrationFilter {
        state,
        subject: given(q.subject),
        pool: given(q.pool),
        before_id,
        limit,
    })
}

#[derive(Serialize)]
struct MigrationDetail {
    migration: MigrationJson,
    parameters: serde_json::Value,
    /// The server's clock when this was read: where open spans end.
    now_ms: i64,
    /// Every run of every stage from the log, in start order.
    spans: Vec<SpanJson>,
    /// The last events of the log (at most `timeline::TAIL`), oldest first.
    events: Vec<EventJson>,
    /// Events of the log read so far; below the log's length only while a
    /// very long log is still being read (the next read goes on).
    events_read: u64,
    log_complete: bool,
    leased_tasks: Vec<LeasedTaskJson>,
}

#[derive(Serialize)]
struct SpanJson {
    stage_index: u32,
    start_ms: i64,
    end_ms: Option<i64>,
    /// `running`, `succeeded`, `failed` or `canceled`.
    outcome: &'static str,
}

impl From<&Span> for SpanJson {
    fn from(s: &Span) -> Self {
        Self {
            stage_index: s.stage_index,
            start_ms: s.start_ms,
            end_ms: s.end_ms,
            outcome: s.outcome,
        }
    }
}

#[derive(Serialize)]
struct EventJson {
    id: i64,
    at_ms: i64,
    kind: &'static str,
    stage_index: Option<u32>,
    task_id: i64,
    attempt: u32,
    worker_id: String,
    message: String,
}

impl From<&Event> for EventJson {
    fn from(e: &Event) -> Self {
        Self {
            id: e.id,
            at_ms: e.at_ms,
            kind: e.kind.as_str(),
            stage_index: e.stage_index,
            task_id: e.task_id,
            attempt: e.attempt,
            worker_id: e.worker_id.clone(),
            message: e.message.clone(),
        }
    }
}

#[derive(Serialize)]
struct LeasedTaskJson {
    task_id: i64,
    attempt: u32,
    stage_index: u32,
    kind: String,
    worker_id: String,
    done: u64,
    total: u64,
    lease_expires_at_ms: Option<i64>,
}

impl From<&LeasedTask> for LeasedTaskJson {
    fn from(t: &LeasedTask) -> Self {
        Self {
            task_id: t.lease.task_id,
            attempt: t.lease.attempt,
            stage_index: t.stage_index,
            kind: t.kind.clone(),
            worker_id: t.worker_id.clone(),
            done: t.done,
            total: t.total,
            lease_expires_at_ms: t.lease_expires_at_ms,
        }
    }
}

pub async fn get_migration(State(d): State<Dashboard>, Path(id): Path<String>) -> Answer {
    let id = id.parse::<i64>().map_err(|_| {
        ApiError::invalid(
            "id",
            format!(
                "{} is not a migration id; use the number the list shows",
                crate::domain::shown(&id)
            ),
        )
    })?;
    let m = d.core.get_migration(id).await?;
    let timeline = d.timelines.read(&d.core, id).await?;
    let leased = d.core.leased_tasks(id, MAX_LEASED).await?;
    Ok(fresh(Json(MigrationDetail {
        migration: MigrationJson::from(&m),
        parameters: m.parameters,
        now_ms: crate::clock::now_ms(),
        spans: timeline.spans.iter().map(SpanJson::from).collect(),
        events: timeline.tail.iter().map(EventJson::from).collect(),
        events_read: timeline.events_read,
        log_complete: timeline.complete,
        leased_tasks: leased.iter().map(LeasedTaskJson::from).collect(),
    })))
}

// --- pools and workers ---------------------------------------------------

#[derive(Serialize)]
struct PoolJson {
    name: String,
    slots: u32,
    /// Slots in use: admitted migrations not yet finished.
    running: u32,
    /// Queue depth: migrations waiting for a slot.
    queued: u32,
    paused: bool,
}

impl From<&Pool> for PoolJson {
    fn from(p: &Pool) -> Self {
        Self {
            name: p.name.clone(),
            slots: p.slots,
            running: p.running,
            queued: p.queued,
            paused: p.paused,
        }
    }
}

#[derive(Serialize)]
struct Pools {
    pools: Vec<PoolJson>,
}

pub async fn list_pools(State(d): State<Dashboard>) -> Answer {
    let pools = d.core.list_pools().await?;
    Ok(fresh(Json(Pools {
        pools: pools.iter().map(PoolJson::from).collect(),
    })))
}

#[derive(Serialize)]
struct WorkerJson {
    worker_id: String,
    name: String,
    kinds: Vec<String>,
    slots: u32,
    draining: bool,
    eligible: bool,
    /// Why it gets no new work; empty when eligible.
    ineligible_reason: String,
    connected_at_ms: i64,
    last_heartbeat_ms: Option<i64>,
    leases: Vec<LeaseJson>,
}

#[derive(Serialize)]
struct LeaseJson {
    task_id: i64,
    attempt: u32,
}

#[derive(Serialize)]
struct Workers {
    workers: Vec<WorkerJson>,
}

pub async fn list_workers(State(d): State<Dashboard>) -> Answer {
    let mut workers = Vec::new();
    for w in d.core.workers().list() {
        let leases = d.core.store().live_leases(&w.spec.worker_id).await?;
        workers.push(worker_json(w, leases));
    }
    Ok(fresh(Json(Workers { workers })))
}

fn worker_json(w: WorkerView, leases: Vec<LeaseToken>) -> WorkerJson {
    WorkerJson {
        worker_id: w.spec.worker_id,
        name: w.spec.name,
        kinds: w.spec.kinds,
        slots: w.spec.slots,
        draining: w.draining,
        eligible: w.ineligible.is_none(),
        ineligible_reason: w
            .ineligible
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        connected_at_ms: w.connected_at_ms,
        last_heartbeat_ms: w.last_heartbeat_ms,
        leases: leases
            .into_iter()
            .map(|l| LeaseJson {
                task_id: l.task_id,
                attempt: l.attempt,
            })
            .collect(),
    }
}

/// Any other `/api/…` path.
pub async fn no_such_endpoint(Path(rest): Path<String>) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        None,
        format!(
            "no endpoint /api/{}; use /api/migrations, /api/migrations/ID, /api/pools, /api/workers or /api/live",
            crate::domain::shown(&rest)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> ListQuery {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        ListQuery {
            state: get("state"),
            subject: get("subject"),
            pool: get("pool"),
            page_size: get("page_size"),
            page_token: get("page_token"),
        }
    }

    #[test]
    fn an_empty_query_is_the_first_page_of_everything() {
        let f = list_filter(query(&[("subject", " "), ("state", "")])).unwrap();
        assert_eq!(
            (f.state, f.subject, f.pool, f.before_id, f.limit),
            (None, None, None, None, DEFAULT_PAGE)
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (pairs, field) in [
            (&[("state", "done")][..], "state"),
            (&[("page_size", "0")][..], "page_size"),
            (&[("page_size", "501")][..], "page_size"),
            (&[("page_size", "x")][..], "page_size"),
            (&[("page_token", "-3")][..], "page_token"),
        ] {
            let e = list_filter(query(pairs)).expect_err("refused");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.field.as_deref(), Some(field), "{pairs:?}");
        }
    }
}
