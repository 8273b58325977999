//! `verify ID` and `verify --all`: the invariant checker
//! ([`stagecoach_verify`]) on event logs read through the API.
//!
//! A migration and its log are two reads, not one snapshot. The rules on a
//! finished migration compare its state and counters with its log, so a
//! finished migration is read again after its log: if it changed meanwhile
//! (retried, or finished just then) both are read again.

use stagecoach_proto::v1::{Event, ListMigrationsRequest, Migration};
use stagecoach_verify::{Violation, violations};

use super::migrations::{get, is_terminal, list_migrations};
use super::{Outcome, events};
use crate::args::VerifyArgs;
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::output::verify::Report;

/// Reads of a migration and its log before the last one is taken as is.
const SNAPSHOT_TRIES: usize = 5;

/// One migration as it was read, and what the checker found.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub migration: Migration,
    pub events: Vec<Event>,
    pub violations: Vec<Violation>,
}

/// Runs the checker on one migration and its whole log.
pub fn judge(migration: Migration, events: Vec<Event>) -> Verdict {
    let violations = violations(&migration, &events);
    Verdict {
        migration,
        events,
        violations,
    }
}

/// Failure as soon as one verdict has a violation.
pub fn outcome(verdicts: &[Verdict]) -> Outcome {
    if verdicts.iter().all(|v| v.violations.is_empty()) {
        Outcome::Success
    } else {
        Outcome::Failure
    }
}

pub async fn verify(s: &Session, out: Out, args: VerifyArgs) -> Result<Outcome, CliError> {
    let ids: Vec<i64> = match args.id {
        Some(id) => vec![id],
        None => list_migrations(s, ListMigrationsRequest::default(), None)
            .await?
            .iter()
            .map(|m| m.id)
            // Oldest first, like the logs.
            .rev()
            .collect(),
    };
    let mut verdicts = Vec::with_capacity(ids.len());
    for id in ids {
        let (migration, log) = snapshot(s, id).await?;
        verdicts.push(judge(migration, log));
    }
    out.print(&Report(&verdicts))?;
    Ok(outcome(&verdicts))
}

/// The migration and its log, read so that a finished migration's state
/// is the one its log ends with.
async fn snapshot(s: &Session, id: i64) -> Result<(Migration, Vec<Event>), CliError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let before = get(s, id).await?;
        let log = events::fetch(s, id, 0).await?;
        if !is_terminal(&before) {
            // Only the log is judged until the migration ends.
            return Ok((before, log));
        }
        let after = get(s, id).await?;
        let same = after.state == before.state && after.finished_at == before.finished_at;
        if same || tries >= SNAPSHOT_TRIES {
            return Ok((after, log));
        }
    }
}

#[cfg(test)]
mod tests {
    use stagecoach_proto::v1::{EventKind, MigrationState, StageProgress, StageState};

    use super::*;
    use crate::output::Render;

    fn event(id: i64, kind: EventKind, stage: Option<u32>, task: i64, attempt: u32) -> Event {
        Event {
            id,
            migration_id: 7,
            kind: kind as i32,
            stage_index: stage,
            task_id: task,
            attempt,
            ..Default::default()
        }
    }

    fn succeeded() -> Migration {
        Migration {
            id: 7,
            state: MigrationState::Succeeded as i32,
            stages: vec![StageProgress {
                index: 0,
                name: "s".into(),
                state: StageState::Succeeded as i32,
                total: 1,
                succeeded: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// One stage, one task, by the rules.
    fn clean_log() -> Vec<Event> {
        use EventKind::*;
        vec![
            event(1, MigrationCreated, None, 0, 0),
            event(2, MigrationAdmitted, None, 0, 0),
            event(3, StageStarted, Some(0), 0, 0),
            event(4, TaskAssigned, Some(0), 1, 1),
            event(5, TaskSucceeded, Some(0), 1, 1),
            event(6, StageSucceeded, Some(0), 0, 0),
            event(7, MigrationSucceeded, None, 0, 0),
        ]
    }

    #[test]
    fn a_clean_log_passes() {
        let verdicts = [judge(succeeded(), clean_log())];
        assert_eq!(outcome(&verdicts), Outcome::Success);
        assert_eq!(
            Report(&verdicts).to_text(),
            "migration 7 (succeeded, 7 events): ok\nverified 1 migration: 0 violations"
        );
    }

    #[test]
    fn a_doctored_log_fails_and_shows_the_events() {
        // The task is assigned again after it succeeded: I5, shown by both
        // the assignment and the earlier success.
        let mut log = clean_log();
        log.insert(5, event(6, EventKind::TaskAssigned, Some(0), 1, 2));
        for (i, e) in log.iter_mut().enumerate() {
            e.id = i as i64 + 1;
        }
        let verdicts = [judge(succeeded(), clean_log()), judge(succeeded(), log)];
        assert_eq!(outcome(&verdicts), Outcome::Failure);
        let text = Report(&verdicts).to_text();
        assert!(
            text.contains("migration 7 (succeeded, 8 events): "),
            "{text}"
        );
        assert!(
            text.contains(
                "  I5: assigned again after it succeeded: #6 TASK_ASSIGNED stage=0 task=1 attempt=2"
            ),
            "{text}"
        );
        assert!(
            text.contains("      -  #6 TASK_ASSIGNED"),
            "the event beneath it: {text}"
        );
        assert!(
            text.ends_with("violations") && !text.ends_with(": 0 violations"),
            "{text}"
        );
        let json = Report(&verdicts).to_json();
        assert_eq!(json["passed"], false);
        let found = &json["migrations"][1]["violations"];
        assert!(
            found.as_array().unwrap().iter().any(|v| v["rule"] == "I5"),
            "{json}"
        );
    }
}
