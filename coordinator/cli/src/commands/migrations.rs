//! `run`, `list`, `show`, `status`, `cancel`, `retry`.

use std::time::SystemTime;

use serde_json::{Map, Value as Json};
use stagecoach_proto::json::json_to_struct;
use stagecoach_proto::v1::create_migration_request::PlanSource;
use stagecoach_proto::v1::{
    CancelMigrationRequest, CreateMigrationRequest, GetMigrationRequest, GetSubjectStatusRequest,
    ListMigrationsRequest, Migration, MigrationState, RetryMigrationRequest,
};

use super::{Outcome, need, watch};
use crate::args::{ListArgs, RunArgs};
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::output::migrations::{Changed, Created, MigrationDetail, MigrationList, SubjectStatus};

/// Creates the migration; with `--watch`, follows it to its end.
pub async fn run(s: &Session, out: Out, args: RunArgs) -> Result<Outcome, CliError> {
    let parameters: Map<String, Json> = args.params.into_iter().collect();
    let deadline = args
        .deadline
        .map(|d| prost_types::Timestamp::from(SystemTime::now() + d));
    let reply = s
        .migrations
        .clone()
        .create_migration(CreateMigrationRequest {
            plan_source: Some(PlanSource::PlanName(args.plan)),
            subject: args.subject,
            parameters: Some(json_to_struct(&Json::Object(parameters))),
            pool: args.pool.unwrap_or_default(),
            deadline,
            idempotency_key: args.idempotency_key.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let migration = need(reply.migration, "CreateMigration", "migration")?;
    if !args.watch {
        out.print(&Created {
            migration: &migration,
            created: reply.created,
        })?;
        return Ok(Outcome::Success);
    }
    // JSON output of a watch is a stream of lines: the creation is one.
    out.print_item(&Created {
        migration: &migration,
        created: reply.created,
    })?;
    watch::watch(s, out, migration.id).await
}

/// Migrations matching `filter`, newest first, at most `limit` (all when
/// `None`), page after page.
pub async fn list_migrations(
    s: &Session,
    filter: ListMigrationsRequest,
    limit: Option<usize>,
) -> Result<Vec<Migration>, CliError> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let want = limit.map_or(1000, |l| (l - all.len()).min(1000));
        let page = s
            .migrations
            .clone()
            .list_migrations(ListMigrationsRequest {
                page_size: want as u32,
                page_token: page_token.clone(),
                ..filter.clone()
            })
            .await?
            .into_inner();
        all.extend(page.migrations);
        if let Some(l) = limit {
            all.truncate(l);
        }
        let full = limit.is_some_and(|l| all.len() >= l);
        if full || page.next_page_token.is_empty() || page.next_page_token == page_token {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

pub async fn list(s: &Session, out: Out, args: ListArgs) -> Result<Outcome, CliError> {
    let filter = ListMigrationsRequest {
        state: args.state.map_or(MigrationState::Unspecified, Into::into) as i32,
        subject: args.subject.unwrap_or_default(),
        pool: args.pool.unwrap_or_default(),
        ..Default::default()
    };
    let migrations = list_migrations(s, filter, Some(args.limit as usize)).await?;
    out.print(&MigrationList(&migrations))?;
    Ok(Outcome::Success)
}

/// GetMigration.
pub async fn get(s: &Session, id: i64) -> Result<Migration, CliError> {
    let reply = s
        .migrations
        .clone()
        .get_migration(GetMigrationRequest { migration_id: id })
        .await?
        .into_inner();
    need(reply.migration, "GetMigration", "migration")
}

pub async fn show(s: &Session, out: Out, id: i64) -> Result<Outcome, CliError> {
    out.print(&MigrationDetail(&get(s, id).await?))?;
    Ok(Outcome::Success)
}

pub async fn status(s: &Session, out: Out, subject: &str) -> Result<Outcome, CliError> {
    let status = s
        .migrations
        .clone()
        .get_subject_status(GetSubjectStatusRequest {
            subject: subject.to_string(),
        })
        .await?
        .into_inner();
    out.print(&SubjectStatus {
        subject,
        status: &status,
    })?;
    Ok(Outcome::Success)
}

pub async fn cancel(s: &Session, out: Out, id: i64, reason: String) -> Result<Outcome, CliError> {
    let reply = s
        .migrations
        .clone()
        .cancel_migration(CancelMigrationRequest {
            migration_id: id,
            reason,
        })
        .await?
        .into_inner();
    out.print(&Changed(&need(
        reply.migration,
        "CancelMigration",
        "migration",
    )?))?;
    Ok(Outcome::Success)
}

pub async fn retry(s: &Session, out: Out, id: i64) -> Result<Outcome, CliError> {
    let reply = s
        .migrations
        .clone()
        .retry_migration(RetryMigrationRequest { migration_id: id })
        .await?
        .into_inner();
    out.print(&Changed(&need(
        reply.migration,
        "RetryMigration",
        "migration",
    )?))?;
    Ok(Outcome::Success)
}

/// Succeeded, failed or canceled.
pub fn is_terminal(m: &Migration) -> bool {
    matches!(
        m.state(),
        MigrationState::Succeeded | MigrationState::Failed | MigrationState::Canceled
    )
}
