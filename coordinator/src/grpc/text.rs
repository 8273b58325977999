//! No NUL character in any string of any request, checked here at the edge.
//!
//! PostgreSQL `text` cannot hold NUL (`\0`) and SQLite can, so without this a
//! lookup on PostgreSQL answered `INTERNAL` and the same request on SQLite
//! stored the NUL. Every handler takes its request through [`checked`], which
//! refuses a NUL with `INVALID_ARGUMENT` naming the field's path before the
//! core or the store sees it, the same on both backends.
//!
//! Each request type lists its strings below. Plans (`plan`, `inline_plan`,
//! `plan_json`) are checked by `PlanSpec::validate` instead, which sees a plan
//! whether it came as a message or as JSON. JSON payloads (`payload`,
//! `parameters`, `output`) may hold NUL in keys and values: they are stored
//! as JSON text, where NUL is the escape `\u0000`, and come back as sent.

use stagecoach_proto::v1 as pb;
use tonic::{Request, Status};

use crate::domain::validate_text;
use crate::error::Result;

/// A request whose strings can be checked, each named by its field path.
pub(super) trait Texts {
    fn check_texts(&self) -> Result<()>;
}

/// The request's message, once none of its strings holds a NUL.
pub(super) fn checked<T: Texts>(req: Request<T>) -> Result<T, Status> {
    let r = req.into_inner();
    r.check_texts()?;
    Ok(r)
}

/// Requests whose strings are plain fields at the top level.
macro_rules! flat {
    ($($ty:ty => [$($field:ident),+];)+) => {$(
        impl Texts for $ty {
            fn check_texts(&self) -> Result<()> {
                $(validate_text(stringify!($field), &self.$field)?;)+
                Ok(())
            }
        }
    )+};
}

flat! {
    pb::GetPlanRequest => [name];
    pb::DeletePlanRequest => [name];
    pb::ListPlansRequest => [page_token];
    pb::ListMigrationsRequest => [subject, pool, page_token];
    pb::CancelMigrationRequest => [reason];
    pb::GetSubjectStatusRequest => [subject];
    pb::CreatePoolRequest => [name];
    pb::SetPoolSlotsRequest => [name];
    pb::PausePoolRequest => [name];
    pb::ResumePoolRequest => [name];
    pb::DrainWorkerRequest => [worker_id];
    pb::UndrainWorkerRequest => [worker_id];
    pb::HeartbeatRequest => [worker_id];
}

impl Texts for pb::PutPlanRequest {
    fn check_texts(&self) -> Result<()> {
        // The plan itself: `PlanSpec::validate`. A NUL byte in the JSON text
        // is never valid JSON; say so the same way.
        match &self.source {
            Some(pb::put_plan_request::Source::PlanJson(json)) => validate_text("plan_json", json),
            _ => Ok(()),
        }
    }
}

impl Texts for pb::CreateMigrationRequest {
    fn check_texts(&self) -> Result<()> {
        if let Some(pb::create_migration_request::PlanSource::PlanName(name)) = &self.plan_source {
            validate_text("plan_name", name)?;
        }
        validate_text("subject", &self.subject)?;
        validate_text("pool", &self.pool)?;
        validate_text("idempotency_key", &self.idempotency_key)
    }
}

impl Texts for pb::SubscribeRequest {
    fn check_texts(&self) -> Result<()> {
        validate_text("worker_id", &self.worker_id)?;
        validate_text("name", &self.name)?;
        for (i, kind) in self.kinds.iter().enumerate() {
            validate_text(&format!("kinds[{i}]"), kind)?;
        }
        Ok(())
    }
}

impl Texts for pb::CompleteRequest {
    fn check_texts(&self) -> Result<()> {
        validate_text("worker_id", &self.worker_id)?;
        for (i, c) in self.completions.iter().enumerate() {
            for (j, t) in c.add_tasks.iter().enumerate() {
                let at = format!("completions[{i}].add_tasks[{j}]");
                validate_text(&format!("{at}.stage"), &t.stage)?;
                validate_text(&format!("{at}.kind"), &t.kind)?;
            }
        }
        Ok(())
    }
}

impl Texts for pb::FailRequest {
    fn check_texts(&self) -> Result<()> {
        validate_text("worker_id", &self.worker_id)?;
        for (i, f) in self.failures.iter().enumerate() {
            validate_text(&format!("failures[{i}].error"), &f.error)?;
        }
        Ok(())
    }
}
