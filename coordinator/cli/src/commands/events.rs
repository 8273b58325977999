//! `events [--follow]`, and reading a whole event log page by page.

use stagecoach_proto::v1::{Event, ListEventsRequest, Migration};

use super::Outcome;
use super::watch::{Follower, follow};
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::output::migrations::EventLine;

/// Events per ListEvents page: the most the API allows.
const PAGE: u32 = 10_000;

/// The migration's events after `after` (0: the whole log), oldest first,
/// paging ListEvents until a page comes back empty.
pub async fn fetch(s: &Session, migration_id: i64, mut after: i64) -> Result<Vec<Event>, CliError> {
    let mut all: Vec<Event> = Vec::new();
    loop {
        let page = s
            .migrations
            .clone()
            .list_events(ListEventsRequest {
                migration_id,
                after_event_id: after,
                limit: PAGE,
            })
            .await?
            .into_inner()
            .events;
        match page.last().map(|e| e.id) {
            // A page that does not move forward would loop for ever.
            Some(last) if last > after => after = last,
            _ => return Ok(all),
        }
        all.extend(page);
    }
}

/// Prints each event as a line (text or JSON).
struct Printer(Out);

impl Follower for Printer {
    fn update(&mut self, events: &[Event], _: Option<&Migration>) -> Result<(), CliError> {
        for e in events {
            self.0.print_item(&EventLine(e))?;
        }
        Ok(())
    }
}

pub async fn events(
    s: &Session,
    out: Out,
    id: i64,
    keep_following: bool,
) -> Result<Outcome, CliError> {
    let log = fetch(s, id, 0).await?;
    let mut printer = Printer(out);
    printer.update(&log, None)?;
    if keep_following {
        let after = log.last().map_or(0, |e| e.id);
        follow(s, id, after, &mut printer).await?;
    }
    Ok(Outcome::Success)
}
