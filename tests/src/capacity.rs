//! Checks across migrations, read from the merged event log of a whole
//! database (every migration's events, sorted by id).
//!
//! - **I3 capacity** ([`check_capacity`]): the migrations of a pool that run
//!   at once never exceed its slots; and admission is immediate: a migration
//!   never waits while a slot is free. How much of that the log proves
//!   depends on the store's [`CommitOrder`]:
//!   - [`CommitOrder::Serial`] (SQLite: one writer, so event ids increase in
//!     commit order and a transaction's events are consecutive): whenever a
//!     migration is queued while a slot is free, the very next event is the
//!     admission of the oldest queued migration, the only exception being
//!     the STAGE_STARTED (and, for empty stages, STAGE_SUCCEEDED and
//!     MIGRATION_SUCCEEDED) events of the migration just admitted, which the
//!     same admission pass writes. So a slot freed by a finishing migration,
//!     or found free by a create, is filled in the same transaction, and all
//!     free slots fill in one pass.
//!   - [`CommitOrder::Concurrent`] (PostgreSQL, coordinators sharing one
//!     database): ids come from one sequence as statements run, so other
//!     migrations' events land between the events of one transaction, and
//!     a transaction may commit after one that took later ids. The
//!     replay in id order is still sound for the slot limit: admissions
//!     into a pool hold the pool's row lock from their count of running
//!     migrations to their commit, so their ids increase in commit order;
//!     and a migration's end is written before its transaction takes that
//!     lock (to refill the slot), so an end with a smaller id than an
//!     admission either committed first or was not yet visible to the
//!     admitter, which then counted the ending migration as running. The
//!     replay can therefore only show *fewer* migrations running than there
//!     were at some instant, never more: every excess it reports is real.
//!     Immediacy cannot be read event by event; instead every stretch in
//!     which the replay shows a migration waiting beside a free slot must
//!     end with an admission, and the longest such stretch (by the events'
//!     database timestamps) is reported in [`Capacity::longest_wait_ms`] for
//!     the caller to bound.
//!
//!   Either way the log must be complete: read it once every migration of
//!   the pool is finished (a log read migration by migration while others
//!   commit is no snapshot). It holds only while the pool is not paused
//!   ([`check_capacity_paused`] says when it may have been).
//! - **I12 worker slots** ([`check_worker_slots`]): a worker never holds more
//!   live leases than it declared slots. A lease lives from TASK_ASSIGNED
//!   until its task's next outcome (TASK_SUCCEEDED, TASK_RETRYING, TASK_DEAD,
//!   TASK_LEASE_EXPIRED, TASK_CANCELED) or its next assignment. Sound on
//!   either backend: a claim counts the worker's committed leases after
//!   taking the worker's lock, so an outcome with a larger id than the
//!   assignment that reused its slot cannot have been counted as free.

use std::collections::{BTreeSet, HashMap, VecDeque};

use stagecoach_proto::v1::{Event, EventKind};

use crate::backend::CommitOrder;
use crate::checker::{describe_event, millis};

/// What [`check_capacity`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capacity {
    /// The most migrations running at once.
    pub max_running: usize,
    /// MIGRATION_ADMITTED events.
    pub admissions: usize,
    /// Times a migration waited for a slot that another one freed (or was
    /// free) and was admitted in the same pass ([`CommitOrder::Concurrent`]:
    /// admissions that ended such a wait).
    pub prompt_admissions: usize,
    /// The longest time, by event timestamps, a migration was seen waiting
    /// while a slot was free (outside pauses).
    pub longest_wait_ms: i64,
}

/// Checks I3 on every event of every migration of one pool (any order; they
/// are sorted by id here), for a pool with `slots` slots that was never
/// paused, on a store that commits in `order`. Returns what it saw, or
/// every violation.
pub fn check_capacity(
    events: &[Event],
    slots: usize,
    order: CommitOrder,
) -> Result<Capacity, Vec<String>> {
    check_capacity_paused(events, slots, order, |_| false)
}

/// Like [`check_capacity`], for a pool that was paused at some point:
/// `paused(e)` says the pool may have been paused when `e` was committed,
/// so nothing needs to be admitted right after it. The slot limit holds
/// throughout.
pub fn check_capacity_paused(
    events: &[Event],
    slots: usize,
    order: CommitOrder,
    paused: impl Fn(&Event) -> bool,
) -> Result<Capacity, Vec<String>> {
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_by_key(|e| e.id);
    let mut errors = Vec::new();
    let mut seen = Capacity::default();
    let mut running: BTreeSet<i64> = BTreeSet::new();
    let mut queue: VecDeque<i64> = VecDeque::new();
    // Set while a migration waits although a slot is free: the event that
    // made it so, and the migration admitted last in this pass.
    let mut owed: Option<(&Event, Option<i64>)> = None;
    for e in events {
        let m = e.migration_id;
        let kind = e.kind();
        let admits = kind == EventKind::MigrationAdmitted;
        if let Some((since, just_admitted)) = owed {
            let head = queue.front().copied();
            let pass_of_admitted = just_admitted == Some(m)
                && matches!(
                    kind,
                    EventKind::StageStarted
                        | EventKind::StageSucceeded
                        | EventKind::MigrationSucceeded
                );
            let admits_head = admits && head == Some(m);
            match order {
                CommitOrder::Serial if !(pass_of_admitted || admits_head) => {
                    errors.push(format!(
                        "I3: migration {head:?} waits with {} of {slots} slots used since {}, but the next event is {}",
                        running.len(),
                        describe_event(since),
                        describe_event(e)
                    ));
                }
                CommitOrder::Serial if admits_head => seen.prompt_admissions += 1,
                CommitOrder::Concurrent if admits => seen.prompt_admissions += 1,
                _ => {}
            }
        }
        match kind {
            EventKind::MigrationCreated | EventKind::MigrationRetried => queue.push_back(m),
            EventKind::MigrationAdmitted => {
                seen.admissions += 1;
                match queue.iter().position(|q| *q == m) {
                    Some(i) => {
                        queue.remove(i);
                    }
                    None => errors.push(format!(
                        "I3: admitted while not queued: {}",
                        describe_event(e)
                    )),
                }
                running.insert(m);
                if running.len() > slots {
                    errors.push(format!(
                        "I3: {} migrations running {:?} with {slots} slots after {}",
                        running.len(),
                        running,
                        describe_event(e)
                    ));
                }
                seen.max_running = seen.max_running.max(running.len());
            }
            EventKind::MigrationSucceeded
            | EventKind::MigrationFailed
            | EventKind::MigrationCanceled => {
                running.remove(&m);
                queue.retain(|q| *q != m);
            }
            _ => {}
        }
        let waiting = !queue.is_empty() && running.len() < slots && !paused(e);
        owed = match (waiting, owed) {
            (false, None) => None,
            (false, Some((since, _))) => {
                seen.longest_wait_ms = seen.longest_wait_ms.max(at(e) - at(since));
                None
            }
            // Still owed: keep the event that started it, note the admission.
            (true, Some((since, last))) => Some((since, if admits { Some(m) } else { last })),
            (true, None) => Some((e, admits.then_some(m))),
        };
    }
    if let Some((since, _)) = owed {
        errors.push(format!(
            "I3: the log ends with migrations {queue:?} queued and {} of {slots} slots used since {}",
            running.len(),
            describe_event(since)
        ));
    }
    if errors.is_empty() {
        Ok(seen)
    } else {
        Err(errors)
    }
}

/// An event's database time in milliseconds (0 if it has none).
fn at(e: &Event) -> i64 {
    e.at.as_ref().map_or(0, millis)
}

/// Checks I12 on the merged log of a coordinator: no worker ever held more
/// live leases than `slots_of(worker_id)`. Returns the most leases any
/// worker held at once.
pub fn check_worker_slots(
    events: &[Event],
    slots_of: impl Fn(&str) -> usize,
) -> Result<usize, Vec<String>> {
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_by_key(|e| e.id);
    let mut errors = Vec::new();
    // Live lease of each task: its worker.
    let mut holder: HashMap<i64, String> = HashMap::new();
    let mut held: HashMap<String, usize> = HashMap::new();
    let mut most = 0;
    for e in events {
        let ends = matches!(
            e.kind(),
            EventKind::TaskAssigned
                | EventKind::TaskSucceeded
                | EventKind::TaskRetrying
                | EventKind::TaskDead
                | EventKind::TaskLeaseExpired
                | EventKind::TaskCanceled
                | EventKind::TaskHandedBack
        );
        if ends && let Some(w) = holder.remove(&e.task_id) {
            *held.entry(w).or_default() -= 1;
        }
        if e.kind() == EventKind::TaskAssigned {
            let n = held.entry(e.worker_id.clone()).or_default();
            *n += 1;
            most = most.max(*n);
            if *n > slots_of(&e.worker_id) {
                errors.push(format!(
                    "I12: worker {:?} holds {n} leases with {} slots after {}",
                    e.worker_id,
                    slots_of(&e.worker_id),
                    describe_event(e)
                ));
            }
            holder.insert(e.task_id, e.worker_id.clone());
        }
    }
    if errors.is_empty() {
        Ok(most)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests;
