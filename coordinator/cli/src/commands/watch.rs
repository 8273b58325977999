//! `watch`: follows a migration over the WatchMigration stream until it
//! ends, and says how it ended.
//!
//! The stream is resumed after the last event seen when it breaks (the
//! coordinator restarting, a load balancer cutting long streams), for up to
//! [`MAX_RESUMES`] tries in a row a second apart, so a watch outlives a short
//! outage instead of failing with it.

use std::time::Duration;

use stagecoach_proto::v1::{Event, Migration, MigrationState, WatchMigrationRequest};
use tonic::Code;

use super::Outcome;
use super::migrations::is_terminal;
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::output::watch::WatchView;

/// Tries in a row to resume a broken stream before giving up.
const MAX_RESUMES: u32 = 30;
/// How often the clock-driven parts of the display are redrawn.
const TICK: Duration = Duration::from_secs(1);

/// What receives the stream: new events and the migration as it now is.
pub trait Follower {
    fn update(&mut self, events: &[Event], migration: Option<&Migration>) -> Result<(), CliError>;
    /// Called every [`TICK`] while waiting.
    fn tick(&mut self) {}
}

impl Follower for WatchView {
    fn update(&mut self, events: &[Event], migration: Option<&Migration>) -> Result<(), CliError> {
        WatchView::update(self, events, migration)
    }

    fn tick(&mut self) {
        WatchView::tick(self);
    }
}

pub async fn watch(s: &Session, out: Out, id: i64) -> Result<Outcome, CliError> {
    let mut view = WatchView::new(out.format);
    let m = follow(s, id, 0, &mut view).await?;
    view.finish(&m)?;
    Ok(if m.state() == MigrationState::Succeeded {
        Outcome::Success
    } else {
        Outcome::Failure
    })
}

/// Streams the events after `after` into `to` until the migration has
/// ended and every event was sent; returns it as it ended.
pub async fn follow(
    s: &Session,
    id: i64,
    mut after: i64,
    to: &mut dyn Follower,
) -> Result<Migration, CliError> {
    let mut latest: Option<Migration> = None;
    let mut failures = 0;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let request = WatchMigrationRequest {
            migration_id: id,
            after_event_id: after,
        };
        let broke = match s.migrations.clone().watch_migration(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    tokio::select! {
                        message = stream.message() => match message {
                            Ok(Some(reply)) => {
                                failures = 0;
                                if let Some(e) = reply.events.last() {
                                    after = after.max(e.id);
                                }
                                to.update(&reply.events, reply.migration.as_ref())?;
                                latest = reply.migration.or(latest);
                            }
                            Ok(None) => break None,
                            Err(status) => break Some(status),
                        },
                        _ = tick.tick() => to.tick(),
                    }
                }
            }
            Err(status) => Some(status),
        };
        if let Some(m) = latest.as_ref().filter(|m| is_terminal(m))
            && broke.is_none()
        {
            return Ok(m.clone());
        }
        // The stream ended early or broke: resume it if that may help.
        let status = broke.unwrap_or_else(|| {
            tonic::Status::unavailable("the WatchMigration stream ended before the migration")
        });
        failures += 1;
        if !matches!(
            status.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ) || failures > MAX_RESUMES
        {
            return Err(status.into());
        }
        tokio::time::sleep(TICK).await;
    }
}
