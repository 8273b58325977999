//! The workers connected to this coordinator: a cache, not a source of truth.
//!
//! Leases live in the database; this map only says which open stream to push
//! an assignment or a cancel notice down, and which workers are eligible for
//! new work (stream open, heartbeat recent, not draining). It is rebuilt by
//! workers reconnecting after a restart.

use std::collections::HashMap;
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

struct Connected {
    conn: u64,
    spec: WorkerSpec,
    tx: mpsc::UnboundedSender<WorkerEvent>,
    connected_at_ms: i64,
    last_seen: Instant,
    draining: bool,
}

/// A connected worker, as operators see it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub spec: WorkerSpec,
    pub connected_at_ms: i64,
    pub draining: bool,
}

/// A worker eligible for new work, for one dispatch pass.
pub(crate) struct Eligible {
    pub spec: WorkerSpec,
    pub tx: mpsc::UnboundedSender<WorkerEvent>,
}

/// The connected workers. A std mutex: it is never held across an await.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<HashMap<String, Connected>>,
    next_conn: AtomicU64,
}

impl Registry {
    /// Registers a stream; a reconnect with the same id replaces the old
    /// stream (which then ends). Returns the connection number for `remove`.
    pub(crate) fn connect(&self, spec: WorkerSpec, tx: mpsc::UnboundedSender<WorkerEvent>) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let entry = Connected {
            conn,
            spec: spec.clone(),
            tx,
            connected_at_ms: crate::clock::now_ms(),
            last_seen: Instant::now(),
            draining: false,
        };
        self.lock().insert(spec.worker_id, entry);
        conn
    }

    /// Forgets a stream, unless a newer one of the same worker replaced it.
    pub(crate) fn disconnect(&self, worker_id: &str, conn: u64) {
        let mut map = self.lock();
        if map.get(worker_id).is_some_and(|c| c.conn == conn) {
            map.remove(worker_id);
        }
    }

    /// Records a sign of life (a heartbeat).
    pub(crate) fn seen(&self, worker_id: &str) {
        if let Some(c) = self.lock().get_mut(worker_id) {
            c.last_seen = Instant::now();
        }
    }

    /// Marks a worker as draining; false if it is not connected.
    pub(crate) fn drain(&self, worker_id: &str) -> Option<WorkerView> {
        let mut map = self.lock();
        let c = map.get_mut(worker_id)?;
        c.draining = true;
        Some(view(c))
    }

    /// Workers that may get new work: stream open, not draining, and heard
    /// from within `recent`.
    pub(crate) fn eligible(&self, recent: Duration) -> Vec<Eligible> {
        self.lock()
            .values()
            .filter(|c| !c.draining && c.last_seen.elapsed() <= recent && !c.tx.is_closed())
            .map(|c| Eligible {
                spec: c.spec.clone(),
                tx: c.tx.clone(),
            })
            .collect()
    }

    /// Sends an event to a worker if it is connected here.
    pub(crate) fn send(&self, worker_id: &str, event: WorkerEvent) -> bool {
        self.lock()
            .get(worker_id)
            .is_some_and(|c| c.tx.send(event).is_ok())
    }

    /// Every connected worker, by id.
    pub fn list(&self) -> Vec<WorkerView> {
        let mut out: Vec<_> = self.lock().values().map(view).collect();
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
}

fn view(c: &Connected) -> WorkerView {
    WorkerView {
        spec: c.spec.clone(),
        connected_at_ms: c.connected_at_ms,
        draining: c.draining,
    }
}
