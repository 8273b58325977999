//! `MigrationService`: thin handlers over the core. Each decodes its request,
//! calls one core method and encodes the answer.

use std::pin::Pin;
use std::sync::Arc;

use stagecoach_proto::json::struct_to_json;
use stagecoach_proto::v1::{self as pb, migration_service_server::MigrationService};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::caller_name;
use super::convert::{self, migration_to_pb, plan_from_pb, plan_to_pb};
use super::text::checked;
use crate::domain::{MigrationFilter, PlanSpec, validate_name};
use crate::engine::{Coordinator, CreateRequest, PlanSource};
use crate::error::Error;
use crate::store::PlanPage;

mod watch;

/// The client API.
pub struct MigrationApi {
    core: Arc<Coordinator>,
}

impl MigrationApi {
    pub fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

/// About how much of a ListPlans page's plans, as JSON text, ends the page
/// early: half of the 4 MiB clients decode by default, leaving room for
/// the protobuf encoding.
const LIST_PLANS_BYTES: usize = 2 << 20;

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchMigrationResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MigrationService for MigrationApi {
    async fn put_plan(
        &self,
        req: Request<pb::PutPlanRequest>,
    ) -> Result<Response<pb::PutPlanResponse>, Status> {
        let by = caller_name(&req);
        let plan = match checked(req)?.source {
            Some(pb::put_plan_request::Source::Plan(p)) => plan_from_pb(p),
            Some(pb::put_plan_request::Source::PlanJson(json)) => PlanSpec::from_json(&json)?,
            None => {
                return Err(
                    Error::invalid("plan", "give the plan as `plan` or as `plan_json`").into(),
                );
            }
        };
        let stored = self.core.put_plan(plan).await?;
        if let Some(by) = by {
            // Plans have no event log: the log says who stored each version.
            tracing::info!(actor = %by, plan = %stored.name, version = stored.version, "plan stored by {by}");
        }
        Ok(Response::new(pb::PutPlanResponse {
            plan: Some(plan_to_pb(&stored)),
        }))
    }

    async fn get_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::GetPlanResponse>, Status> {
        let name = checked(req)?.name;
        if name.is_empty() {
            return Err(Error::invalid("name", "the plan name is required").into());
        }
        let plan = self.core.get_plan(&name).await?;
        Ok(Response::new(pb::GetPlanResponse {
            plan: Some(plan_to_pb(&plan)),
        }))
    }

    async fn list_plans(
        &self,
        req: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let r = checked(req)?;
        let limit = page_size(r.page_size)?;
        // The token is the last name of the previous page (keyset paging).
        let after = if r.page_token.is_empty() {
            None
        } else {
            validate_name("page_token", &r.page_token, "page token").map_err(|_| {
                Error::invalid(
                    "page_token",
                    "not a token this server issued; pass next_page_token unchanged",
                )
            })?;
            Some(r.page_token)
        };
        let page = self
            .core
            .list_plans(&PlanPage {
                after,
                limit,
                include_tasks: r.include_tasks,
                max_bytes: LIST_PLANS_BYTES,
            })
            .await?;
        let next_page_token = match page.plans.last() {
            Some(last) if page.more => last.name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListPlansResponse {
            plans: page.plans.iter().map(plan_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn delete_plan(
        &self,
        req: Request<pb::DeletePlanRequest>,
    ) -> Result<Response<pb::DeletePlanResponse>, Status> {
        let by = caller_name(&req);
        let name = checked(req)?.name;
        let deleted = self.core.delete_plan(&name).await?;
        // Plans have no event log: the log says who deleted one.
        tracing::info!(actor = by.as_deref().unwrap_or(""), plan = %name, versions = deleted, "plan deleted");
        Ok(Response::new(pb::DeletePlanResponse {
            versions_deleted: deleted.min(u32::MAX as u64) as u32,
        }))
    }

    async fn create_migration(
        &self,
        req: Request<pb::CreateMigrationRequest>,
    ) -> Result<Response<pb::CreateMigrationResponse>, Status> {
        let by = caller_name(&req);
        let r = checked(req)?;
        let plan = match r.plan_source {
            Some(pb::create_migration_request::PlanSource::PlanName(name)) => {
                PlanSource::Named(name)
            }
            Some(pb::create_migration_request::PlanSource::InlinePlan(p)) => {
                PlanSource::Inline(plan_from_pb(p))
            }
            None => {
                return Err(Error::invalid(
                    "plan_name",
                    "name a stored plan in `plan_name`, or give `inline_plan`",
                )
                .into());
            }
        };
        let deadline_ms = r
            .deadline
            .as_ref()
            .map(|t| convert::timestamp_ms("deadline", t))
            .transpose()?;
        let (migration, created) = self
            .core
            .create_migration(CreateRequest {
                plan,
                subject: r.subject,
                parameters: struct_to_json(r.parameters.as_ref()),
                pool: r.pool,
                deadline_ms,
                idempotency_key: Some(r.idempotency_key).filter(|k| !k.is_empty()),
                created_by: by,
            })
            .await?;
        Ok(Response::new(pb::CreateMigrationResponse {
            migration: Some(migration_to_pb(&migration)),
            created,
        }))
    }

    async fn get_migration(
        &self,
        req: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<pb::GetMigrationResponse>, Status> {
        let m = self
            .core
            .get_migration(req.into_inner().migration_id)
            .await?;
        Ok(Response::new(pb::GetMigrationResponse {
            migration: Some(migration_to_pb(&m)),
        }))
    }

    async fn list_migrations(
        &self,
        req: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        let r = checked(req)?;
        let limit = page_size(r.page_size)?;
        let before_id = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse::<i64>().map_err(|_| {
                Error::invalid(
                    "page_token",
                    "not a token this server issued; pass next_page_token unchanged",
                )
            })?)
        };
        let filter = MigrationFilter {
            state: convert::migration_state_from_pb("state", r.state)?,
            subject: Some(r.subject).filter(|s| !s.is_empty()),
            pool: Some(r.pool).filter(|s| !s.is_empty()),
            before_id,
            limit,
        };
        let page = self.core.list_migrations(&filter).await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() == limit as usize => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListMigrationsResponse {
            migrations: page.iter().map(migration_to_pb).collect(),
            next_page_token,
        }))
    }

    type WatchMigrationStream = WatchStream;

    async fn watch_migration(
        &self,
        req: Request<pb::WatchMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
        let r = req.into_inner();
        let stream = watch::stream(self.core.clone(), r.migration_id, r.after_event_id).await?;
        Ok(Response::new(stream))
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::CancelMigrationResponse>, Status> {
        let by = caller_name(&req);
        let r = checked(req)?;
        let m = self
            .core
            .cancel_migration(r.migration_id, &r.reason, by.as_deref())
            .await?;
        Ok(Response::new(pb::CancelMigrationResponse {
            migration: Some(migration_to_pb(&m)),
        }))
    }

    async fn retry_migration(
        &self,
        req: Request<pb::RetryMigrationRequest>,
    ) -> Result<Response<pb::RetryMigrationResponse>, Status> {
        let by = caller_name(&req);
        let m = self
            .core
            .retry_migration(req.into_inner().migration_id, by.as_deref())
            .await?;
        Ok(Response::new(pb::RetryMigrationResponse {
            migration: Some(migration_to_pb(&m)),
        }))
    }

    async fn get_subject_status(
        &self,
        req: Request<pb::GetSubjectStatusRequest>,
    ) -> Result<Response<pb::GetSubjectStatusResponse>, Status> {
        let view = self.core.subject_status(&checked(req)?.subject).await?;
        Ok(Response::new(pb::GetSubjectStatusResponse {
            status: convert::subject_status_to_pb(view.status) as i32,
            latest: view.latest.as_ref().map(migration_to_pb),
            last_succeeded: view.last_succeeded.as_ref().map(migration_to_pb),
        }))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n @ 1..=10_000 => n,
            n => {
                return Err(Error::invalid(
                    "limit",
                    format!("{n} is more than 10000; use 1-10000"),
                )
                .into());
            }
        };
        let events = self
            .core
            .list_events(r.migration_id, r.after_event_id, limit)
            .await?;
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(convert::event_to_pb).collect(),
        }))
    }
}

/// A list call's `page_size`: 0 means 100; at most 1,000.
fn page_size(n: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(100),
        1..=1000 => Ok(n),
        n => Err(Error::invalid("page_size", format!("{n} is more than 1000; use 1-1000")).into()),
    }
}
