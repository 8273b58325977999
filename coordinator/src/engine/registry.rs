//! The workers connected to this coordinator: a cache, not a source of truth.
//!
//! Leases live in the database; this map only says which open stream to push
//! an assignment or a cancel notice down, and which workers are eligible for
//! new work. It is rebuilt by workers reconnecting after a restart.
//!
//! # Eligibility
//!
//! A worker gets new work only while all of these hold ([`Ineligible`] says
//! which one failed, in `ListWorkers` and in the log):
//!
//! - its stream is open and it is not draining;
//! - it proved it is alive within three heartbeat intervals: a Heartbeat
//!   call, or subscribing (a new stream). Complete and Fail do not count:
//!   only a heartbeat renews leases, so a worker that reports but never
//!   heartbeats would lose every lease it is given;
//! - no lease of it expired since its last heartbeat. A stage's
//!   `heartbeat_timeout_ms` may be as short as two intervals, so a frozen
//!   worker's lease can expire while the worker still looks recent; without
//!   this rule the task would often go straight back to it. The sweeper that
//!   expired the lease names the worker in `Effects::lost`, which reaches
//!   this coordinator through [`Registry::lost_lease`] whichever coordinator
//!   swept (PostgreSQL `NOTIFY`). A heartbeat received after that clears it;
//!   one that raced the notice only delays the worker by an interval.
//!
//! Correctness does not hang on this cache: a missed notice leaves the
//! worker eligible, and the claim still deals a lost task to another
//! worker first (`tasks.expired_worker`, `store::common::deal`).
//!
//! Each pass logs a worker's change of eligibility once: a warning when it
//! stops getting work (info when it was drained), info when it gets work
//! again.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::domain::{Assignment, LeaseToken};

/// What the coordinator pushes down a worker's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// A task leased to the worker.
    Assign(Assignment),
    /// Stop this attempt; its lease is gone.
    Cancel { lease: LeaseToken, reason: String },
}

/// A worker as it subscribed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    pub worker_id: String,
    pub name: String,
    pub kinds: Vec<String>,
    pub slots: u32,
}

/// The per-process secret a worker subscribes with (0: none): the same
/// value proves a Subscribe comes from the process whose stream is open.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Instance(pub u64);

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Instance(..)")
    }
}

struct Connected {
    conn: u64,
    spec: WorkerSpec,
    instance: Instance,
    tx: mpsc::UnboundedSender<WorkerEvent>,
    connected_at_ms: i64,
    /// When the stream opened: a sign of life until the first heartbeat.
    connected: Instant,
    /// The last heartbeat received, and its wall-clock time for operators.
    last_heartbeat: Option<(Instant, i64)>,
    /// When this coordinator learned that a lease of it expired, if no
    /// heartbeat arrived since.
    lease_lost: Option<Instant>,
    draining: bool,
    /// Whether the last pass found it ineligible: its change is logged once.
    benched: bool,
    /// Whether the database gave it the worker id ([`Registry::confirm`]):
    /// until then it gets no work and is not listed, as it may yet be
    /// refused for a stream of the id on another coordinator.
    claimed: bool,
}

/// A Subscribe refused: the worker id has an open stream of another
/// process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken;

/// Why a connected worker gets no new work.
#[derive(Debug, Clone, PartialEq)]
pub enum Ineligible {
    /// An operator drained it.
    Draining,
    /// Its stream has closed; it is about to leave the registry.
    StreamClosed,
    /// A lease of it expired `ago`, and no heartbeat came since.
    LeaseExpired { ago: Duration },
    /// Nothing heard from it for `silent` (no heartbeat at all, when
    /// `never`: `silent` counts from its Subscribe); workers must send a
    /// Heartbeat every `interval`.
    Silent {
        silent: Duration,
        never: bool,
        interval: Duration,
    },
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Draining => write!(f, "draining"),
            Ineligible::StreamClosed => write!(f, "its Subscribe stream closed"),
            Ineligible::LeaseExpired { ago } => write!(
                f,
                "a lease it held expired {:.1} s ago; waiting for a heartbeat",
                ago.as_secs_f64()
            ),
            Ineligible::Silent {
                silent,
                never,
                interval,
            } => {
                let secs = silent.as_secs_f64();
                if *never {
                    write!(f, "no heartbeat since it subscribed {secs:.1} s ago")?;
                } else {
                    write!(f, "no heartbeat for {secs:.1} s")?;
                }
                write!(
                    f,
                    "; workers must send Heartbeat every {} ms (Complete and Fail do not count)",
                    interval.as_millis()
                )
            }
        }
    }
}

/// A connected worker, as operators see it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub spec: WorkerSpec,
    pub connected_at_ms: i64,
    pub draining: bool,
    /// When its last heartbeat arrived (ms since the epoch); none yet: `None`.
    pub last_heartbeat_ms: Option<i64>,
    /// Why it gets no new work now; `None`: it is eligible.
    pub ineligible: Option<Ineligible>,
}

/// A worker eligible for new work, for one dispatch pass.
pub(crate) struct Eligible {
    pub spec: WorkerSpec,
    pub tx: mpsc::UnboundedSender<WorkerEvent>,
}

/// A worker whose eligibility changed since the previous pass.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    pub worker_id: String,
    /// Why it stopped getting work; `None`: it gets work again.
    pub now: Option<Ineligible>,
}

/// The connected workers. A std mutex: it is never held across an await.
pub struct Registry {
    workers: Mutex<HashMap<String, Connected>>,
    next_conn: AtomicU64,
    /// How often workers must heartbeat; three of these without a sign of
    /// life and a worker gets no new work (its leases are reclaimed only
    /// when they expire, a threshold of their own).
    heartbeat_interval: Duration,
}

impl Registry {
    /// An empty registry for workers that heartbeat every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        Registry {
            workers: Mutex::default(),
            next_conn: AtomicU64::new(0),
            heartbeat_interval,
        }
    }

    /// Registers a stream and returns its connection number for
    /// `disconnect`. A new stream is a sign of life, as a heartbeat is. It
    /// gets work once [`confirm`](Self::confirm)ed.
    ///
    /// One stream per worker id: while the id's stream is open (its
    /// receiver not dropped), a second Subscribe would let anyone who knows
    /// the id (`ListWorkers` shows it) take the worker's assignments, so it
    /// is refused ([`Taken`]) — unless it names the same nonzero
    /// [`Instance`]: the same process reconnecting after a network drop the
    /// server has not noticed yet (the old stream's connection still looks
    /// open). That one replaces the old stream, which then ends. A closed
    /// stream's entry is replaced by anyone: its `Registration` is being
    /// dropped and would remove it.
    pub(crate) fn connect(
        &self,
        spec: WorkerSpec,
        instance: Instance,
        tx: mpsc::UnboundedSender<WorkerEvent>,
    ) -> Result<u64, Taken> {
        let mut map = self.lock();
        let old = map.get(&spec.worker_id);
        if let Some(old) = old
            && !old.tx.is_closed()
            && (instance.0 == 0 || old.instance != instance)
        {
            return Err(Taken);
        }
        let last_heartbeat = old.and_then(|c| c.last_heartbeat);
        // A drained process stays drained across its own reconnect.
        let draining = old.is_some_and(|c| c.draining && c.instance == instance && instance.0 != 0);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let entry = Connected {
            conn,
            spec: spec.clone(),
            instance,
            tx,
            connected_at_ms: crate::clock::now_ms(),
            connected: Instant::now(),
            last_heartbeat,
            lease_lost: None,
            draining,
            benched: false,
            claimed: false,
        };
        map.insert(spec.worker_id, entry);
        Ok(conn)
    }

    /// Lets a stream `connect` registered get work and be listed: the
    /// database gave it the worker id (`WorkerStreams::claim`). False if it
    /// is gone meanwhile.
    pub(crate) fn confirm(&self, worker_id: &str, conn: u64) -> bool {
        let mut map = self.lock();
        match map.get_mut(worker_id) {
            Some(c) if c.conn == conn => {
                c.claimed = true;
                true
            }
            _ => false,
        }
    }

    /// The confirmed streams, as `(worker id, connection number)`.
    pub(crate) fn claimed(&self) -> Vec<(String, u64)> {
        self.lock()
            .values()
            .filter(|c| c.claimed)
            .map(|c| (c.spec.worker_id.clone(), c.conn))
            .collect()
    }

    /// Forgets a stream, unless a newer one of the same worker replaced it;
    /// if it was open, dropping its sender ends it.
    pub(crate) fn disconnect(&self, worker_id: &str, conn: u64) {
        let mut map = self.lock();
        if map.get(worker_id).is_some_and(|c| c.conn == conn) {
            map.remove(worker_id);
        }
    }

    /// Records a heartbeat. True when that may make the worker eligible
    /// again (it was held back): worth a dispatch pass.
    pub(crate) fn seen(&self, worker_id: &str) -> bool {
        let mut map = self.lock();
        let Some(c) = map.get_mut(worker_id) else {
            return false;
        };
        c.last_heartbeat = Some((Instant::now(), crate::clock::now_ms()));
        let held_back = c.benched || c.lease_lost.is_some();
        c.lease_lost = None;
        held_back
    }

    /// Records that a lease of the worker expired (a sweep's
    /// `Effects::lost`): no new work until its next heartbeat. False if it
    /// is not connected here.
    pub(crate) fn lost_lease(&self, worker_id: &str) -> bool {
        let mut map = self.lock();
        let Some(c) = map.get_mut(worker_id) else {
            return false;
        };
        c.lease_lost = Some(Instant::now());
        true
    }

    /// Marks a worker as draining; `None` if it is not connected.
    pub(crate) fn drain(&self, worker_id: &str) -> Option<WorkerView> {
        self.set_draining(worker_id, true)
    }

    /// Undoes `drain`: eligible again from the next pass (if nothing else
    /// holds it back); `None` if it is not connected.
    pub(crate) fn undrain(&self, worker_id: &str) -> Option<WorkerView> {
        self.set_draining(worker_id, false)
    }

    fn set_draining(&self, worker_id: &str, draining: bool) -> Option<WorkerView> {
        let mut map = self.lock();
        let c = map.get_mut(worker_id)?;
        c.draining = draining;
        Some(self.view(c, Instant::now()))
    }

    /// Workers that may get new work now (module doc, "Eligibility"),
    /// logging each worker whose eligibility changed since the last pass.
    pub(crate) fn eligible(&self) -> Vec<Eligible> {
        let (eligible, changes) = self.pass();
        for change in changes {
            let worker_id = change.worker_id.as_str();
            match change.now {
                None => tracing::info!(worker_id, "worker gets new work again"),
                Some(Ineligible::Draining) => {
                    tracing::info!(worker_id, "worker drained: it gets no new work")
                }
                Some(reason) => tracing::warn!(
                    worker_id,
                    reason = %reason,
                    "worker gets no new work until it heartbeats"
                ),
            }
        }
        eligible
    }

    /// The eligible workers, and the changes since the last pass.
    fn pass(&self) -> (Vec<Eligible>, Vec<Change>) {
        let now = Instant::now();
        let mut changes = Vec::new();
        let mut map = self.lock();
        let eligible = map
            .values_mut()
            .filter(|c| c.claimed)
            .filter_map(|c| {
                let status = self.status(c, now);
                // A closing stream leaves the registry at once: nothing to say.
                if c.benched != status.is_some() && status != Some(Ineligible::StreamClosed) {
                    c.benched = status.is_some();
                    changes.push(Change {
                        worker_id: c.spec.worker_id.clone(),
                        now: status.clone(),
                    });
                }
                status.is_none().then(|| Eligible {
                    spec: c.spec.clone(),
                    tx: c.tx.clone(),
                })
            })
            .collect();
        (eligible, changes)
    }

    /// Why `c` gets no new work at `now`, if it does not.
    fn status(&self, c: &Connected, now: Instant) -> Option<Ineligible> {
        if c.tx.is_closed() {
            return Some(Ineligible::StreamClosed);
        }
        if c.draining {
            return Some(Ineligible::Draining);
        }
        if let Some(at) = c.lease_lost {
            return Some(Ineligible::LeaseExpired {
                ago: now.saturating_duration_since(at),
            });
        }
        let heartbeat = c.last_heartbeat.map(|(at, _)| at);
        let alive = heartbeat.map_or(c.connected, |at| at.max(c.connected));
        let silent = now.saturating_duration_since(alive);
        (silent > self.heartbeat_interval * 3).then_some(Ineligible::Silent {
            silent,
            never: heartbeat.is_none(),
            interval: self.heartbeat_interval,
        })
    }

    /// Sends an event to a worker if it is connected here.
    pub(crate) fn send(&self, worker_id: &str, event: WorkerEvent) -> bool {
        self.lock()
            .get(worker_id)
            .is_some_and(|c| c.tx.send(event).is_ok())
    }

    /// Every connected worker, by id, with its eligibility now.
    pub fn list(&self) -> Vec<WorkerView> {
        let now = Instant::now();
        let mut out: Vec<_> = self
            .lock()
            .values()
            .filter(|c| c.claimed)
            .map(|c| self.view(c, now))
            .collect();
        out.sort_by(|a, b| a.spec.worker_id.cmp(&b.spec.worker_id));
        out
    }

    /// Drops every stream (shutdown): each Subscribe stream then ends.
    pub(crate) fn close_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connected>> {
        // A panic while holding this lock leaves a consistent map (every
        // update is a single insert or remove), so poisoning is ignored.
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn view(&self, c: &Connected, now: Instant) -> WorkerView {
        WorkerView {
            spec: c.spec.clone(),
            connected_at_ms: c.connected_at_ms,
            draining: c.draining,
            last_heartbeat_ms: c.last_heartbeat.map(|(_, ms)| ms),
            ineligible: self.status(c, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> WorkerSpec {
        WorkerSpec {
            worker_id: id.into(),
            name: String::new(),
            kinds: vec!["noop".into()],
            slots: 1,
        }
    }

    /// Connects and confirms, as a Subscribe the database accepted.
    fn join(
        r: &Registry,
        spec: WorkerSpec,
        instance: Instance,
        tx: mpsc::UnboundedSender<WorkerEvent>,
    ) -> Result<u64, Taken> {
        let id = spec.worker_id.clone();
        let conn = r.connect(spec, instance, tx)?;
        assert!(r.confirm(&id, conn));
        Ok(conn)
    }

    #[test]
    fn a_stream_gets_work_only_once_the_database_gave_it_the_id() {
        let r = Registry::new(Duration::from_secs(60));
        let (tx, _rx) = mpsc::unbounded_channel();
        let first = r.connect(spec("a"), Instance(1), tx).unwrap();
        assert!(r.pass().0.is_empty() && r.list().is_empty() && r.claimed().is_empty());
        let (tx, _rx2) = mpsc::unbounded_channel();
        assert_eq!(
            r.connect(spec("a"), Instance(2), tx),
            Err(Taken),
            "an unconfirmed stream holds its id here all the same"
        );
        let (tx, _rx3) = mpsc::unbounded_channel();
        let second = r.connect(spec("a"), Instance(1), tx).unwrap();
        assert!(!r.confirm("a", first), "replaced meanwhile");
        assert!(r.confirm("a", second));
        assert_eq!(ids(&r.pass().0), ["a"]);
        assert_eq!(r.claimed(), [("a".to_string(), second)]);
        // A refused stream is undone: the id is free again.
        r.disconnect("a", second);
        assert!(r.list().is_empty() && r.claimed().is_empty());
    }

    fn ids(eligible: &[Eligible]) -> Vec<&str> {
        let mut ids: Vec<_> = eligible.iter().map(|e| e.spec.worker_id.as_str()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn one_stream_per_worker_id_unless_the_same_instance_reconnects() {
        let r = Registry::new(Duration::from_secs(60));
        let (tx1, rx1) = mpsc::unbounded_channel();
        let first = join(&r, spec("a"), Instance(1), tx1).unwrap();
        for other in [Instance(0), Instance(2)] {
            let (tx, _rx) = mpsc::unbounded_channel();
            assert_eq!(join(&r, spec("a"), other, tx), Err(Taken));
        }
        assert!(r.drain("a").is_some());
        // The same process: takes over, stays drained; the old stream ends.
        let (tx2, rx2) = mpsc::unbounded_channel();
        let second = join(&r, spec("a"), Instance(1), tx2).unwrap();
        assert!(rx1.is_closed(), "the old stream's sender is gone");
        assert!(r.list()[0].draining);
        // The old stream's late disconnect leaves the new one registered.
        r.disconnect("a", first);
        assert_eq!(r.list().len(), 1);
        // Once the stream is closed, anyone may take the id.
        drop(rx2);
        let (tx3, _rx3) = mpsc::unbounded_channel();
        assert!(join(&r, spec("a"), Instance(0), tx3).is_ok());
        r.disconnect("a", second);
        assert_eq!(r.list().len(), 1);
        assert!(!r.list()[0].draining);
    }

    #[test]
    fn a_worker_whose_lease_expired_waits_for_its_next_heartbeat() {
        let r = Registry::new(Duration::from_secs(60));
        let (tx, _rx) = mpsc::unbounded_channel();
        join(&r, spec("a"), Instance::default(), tx.clone()).unwrap();
        join(&r, spec("b"), Instance::default(), tx).unwrap();
        assert_eq!(
            ids(&r.pass().0),
            ["a", "b"],
            "a new stream is a sign of life"
        );

        assert!(r.lost_lease("a"));
        assert!(!r.lost_lease("elsewhere"), "not connected here");
        let (eligible, changes) = r.pass();
        assert_eq!(ids(&eligible), ["b"]);
        assert_eq!(changes.len(), 1);
        assert!(matches!(
            changes[0].now,
            Some(Ineligible::LeaseExpired { .. })
        ));
        let view = &r.list()[0];
        let reason = view.ineligible.as_ref().unwrap().to_string();
        assert!(
            reason.starts_with("a lease it held expired")
                && reason.ends_with("waiting for a heartbeat"),
            "{reason}"
        );
        assert_eq!(r.pass().1, [], "logged once, not every pass");

        assert!(r.seen("a"), "a heartbeat after the expiry: worth a pass");
        let (eligible, changes) = r.pass();
        assert_eq!(ids(&eligible), ["a", "b"]);
        assert_eq!(
            changes,
            [Change {
                worker_id: "a".into(),
                now: None
            }]
        );
        assert!(!r.seen("a"), "an ordinary heartbeat");
        assert!(r.list()[0].last_heartbeat_ms.is_some());
    }

    #[test]
    fn a_worker_that_never_heartbeats_stops_getting_work_and_says_why() {
        let r = Registry::new(Duration::from_millis(1));
        let (tx, _rx) = mpsc::unbounded_channel();
        join(&r, spec("quiet"), Instance::default(), tx).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let (eligible, changes) = r.pass();
        assert!(eligible.is_empty());
        assert_eq!(changes.len(), 1);
        let view = &r.list()[0];
        assert_eq!(view.last_heartbeat_ms, None);
        let reason = view.ineligible.as_ref().unwrap().to_string();
        assert!(
            reason.starts_with("no heartbeat since it subscribed")
                && reason.contains("workers must send Heartbeat every 1 ms"),
            "{reason}"
        );
        assert_eq!(r.pass().1, [], "logged once");
        assert!(r.seen("quiet"));
        assert_eq!(r.pass().0.len(), 1);
        std::thread::sleep(Duration::from_millis(10));
        let reason = r.list()[0].ineligible.as_ref().unwrap().to_string();
        assert!(reason.starts_with("no heartbeat for "), "{reason}");
    }

    #[test]
    fn drained_and_closed_workers_get_nothing() {
        let r = Registry::new(Duration::from_secs(60));
        let (tx, rx) = mpsc::unbounded_channel();
        join(&r, spec("d"), Instance::default(), tx).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        join(&r, spec("e"), Instance::default(), tx).unwrap();
        r.drain("e");
        drop(rx);
        let (eligible, changes) = r.pass();
        assert!(eligible.is_empty());
        assert_eq!(
            changes,
            [Change {
                worker_id: "e".into(),
                now: Some(Ineligible::Draining)
            }],
            "a closed stream is not worth a log line"
        );
        assert_eq!(
            r.list()[1].ineligible.as_ref().unwrap().to_string(),
            "draining"
        );
    }
}
