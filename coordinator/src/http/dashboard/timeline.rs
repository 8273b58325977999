//! A migration's stage spans and the tail of its event log, read from the
//! log itself: the Gantt chart shows what happened (a retried stage runs
//! twice), not only the latest start and end the stage rows keep.
//!
//! The log only grows and its ids only rise, so what was read is kept per
//! migration with its cursor and each later read goes on from there: a page
//! that refreshes on every change reads only the new events. A long log is
//! read at most [`PAGES_PER_READ`] pages at a time, so no request is slow;
//! the answer then says the log is not read to its end yet.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::domain::{Event, EventKind};
use crate::engine::Coordinator;
use crate::error::Result;

/// Events of the log's tail kept and shown.
pub const TAIL: usize = 50;
/// Events per store read.
const PAGE: u32 = 5_000;
/// Store reads per request, at most.
const PAGES_PER_READ: usize = 20;
/// Migrations whose reads are kept; the least recently shown goes first.
const KEPT: usize = 256;

/// One run of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub stage_index: u32,
    pub start_ms: i64,
    /// `None` while it runs.
    pub end_ms: Option<i64>,
    /// `running`, `succeeded`, `failed` or `canceled`.
    pub outcome: &'static str,
}

/// What the log of one migration says so far.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub spans: Vec<Span>,
    pub tail: VecDeque<Event>,
    pub events_read: u64,
    /// False while a long log is still being read.
    pub complete: bool,
    /// The id of the last event read (the cursor).
    after_id: i64,
}

impl Timeline {
    /// Folds the next event of the log in.
    fn push(&mut self, e: Event) {
        self.after_id = e.id;
        self.events_read += 1;
        match (e.kind, e.stage_index) {
            (EventKind::StageStarted, Some(stage_index)) => self.spans.push(Span {
                stage_index,
                start_ms: e.at_ms,
                end_ms: None,
                outcome: "running",
            }),
            (EventKind::StageSucceeded, Some(stage)) => self.end(Some(stage), e.at_ms, "succeeded"),
            (EventKind::StageFailed, Some(stage)) => self.end(Some(stage), e.at_ms, "failed"),
            // A migration that ends ends the stages it was running.
            (EventKind::MigrationFailed, _) => self.end(None, e.at_ms, "failed"),
            (EventKind::MigrationCanceled, _) => self.end(None, e.at_ms, "canceled"),
            _ => {}
        }
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(e);
    }

    /// Ends the open spans of `stage` (all open spans: `None`).
    fn end(&mut self, stage: Option<u32>, at_ms: i64, outcome: &'static str) {
        for span in &mut self.spans {
            if span.end_ms.is_none() && stage.is_none_or(|s| s == span.stage_index) {
                span.end_ms = Some(at_ms);
                span.outcome = outcome;
            }
        }
    }
}

/// The timelines read so far, by migration id.
#[derive(Default)]
pub struct Timelines {
    kept: Mutex<HashMap<i64, (Timeline, Instant)>>,
}

impl Timelines {
    /// The timeline of `migration_id`, read on from where the last read
    /// stopped.
    pub async fn read(&self, core: &Coordinator, migration_id: i64) -> Result<Timeline> {
        let mut timeline = self
            .lock()
            .get(&migration_id)
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        timeline.complete = false;
        for _ in 0..PAGES_PER_READ {
            let page = core
                .list_events(migration_id, timeline.after_id, PAGE)
                .await?;
            let last_page = page.len() < PAGE as usize;
            page.into_iter().for_each(|e| timeline.push(e));
            if last_page {
                timeline.complete = true;
                break;
            }
        }
        let mut kept = self.lock();
        // Two requests may read at once: keep whichever read further.
        let further = kept
            .get(&migration_id)
            .is_none_or(|(t, _)| t.after_id <= timeline.after_id);
        if further {
            if kept.len() >= KEPT && !kept.contains_key(&migration_id) {
                let oldest = kept
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(id, _)| *id);
                oldest.map(|id| kept.remove(&id));
            }
            kept.insert(migration_id, (timeline.clone(), Instant::now()));
        }
        Ok(timeline)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (Timeline, Instant)>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, kind: EventKind, stage: Option<u32>) -> Event {
        Event {
            id,
            migration_id: 1,
            at_ms: id * 10,
            kind,
            stage_index: stage,
            task_id: 0,
            attempt: 0,
            worker_id: String::new(),
            message: String::new(),
        }
    }

    #[test]
    fn spans_follow_the_log_across_a_retry() {
        use EventKind::*;
        let mut t = Timeline::default();
        for e in [
            event(1, MigrationCreated, None),
            event(2, StageStarted, Some(0)),
            event(3, TaskSucceeded, Some(0)),
            event(4, StageSucceeded, Some(0)),
            event(5, StageStarted, Some(1)),
            event(6, StageFailed, Some(1)),
            event(7, MigrationFailed, None),
            event(8, MigrationRetried, None),
            event(9, StageStarted, Some(1)),
            event(10, MigrationCanceled, None),
            event(11, StageStarted, Some(2)),
        ] {
            t.push(e);
        }
        let spans: Vec<_> = t
            .spans
            .iter()
            .map(|s| (s.stage_index, s.start_ms, s.end_ms, s.outcome))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 20, Some(40), "succeeded"),
                (1, 50, Some(60), "failed"),
                (1, 90, Some(100), "canceled"),
                (2, 110, None, "running"),
            ]
        );
        assert_eq!((t.events_read, t.after_id), (11, 11));
    }

    #[test]
    fn the_tail_keeps_the_last_events() {
        let mut t = Timeline::default();
        for id in 1..=(TAIL as i64 + 7) {
            t.push(event(id, EventKind::TaskSucceeded, Some(0)));
        }
        assert_eq!(t.tail.len(), TAIL);
        assert_eq!(t.tail.front().map(|e| e.id), Some(8));
        assert_eq!(t.tail.back().map(|e| e.id), Some(TAIL as i64 + 7));
    }
}
