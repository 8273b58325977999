//! One live Subscribe stream per worker id across every coordinator on the
//! database: this coordinator's side of the claims `store::streams` keeps.
//!
//! A stream is registered here first (the registry refuses a second one
//! among this coordinator's streams at no cost), then claimed in the
//! database, and gets work only once both agreed. The claims live as long
//! as this coordinator renews them ([`run_stream_claims`], every heartbeat
//! interval); a stream's end releases its own, and the shutdown all of
//! them once every stream has ended.
//!
//! [`run_stream_claims`]: super::run_stream_claims

use std::collections::HashSet;

use super::{Coordinator, Instance};
use crate::error::{Error, Result};
use crate::store::StreamClaim;

impl Coordinator {
    /// Claims `worker_id` for stream `conn` in the database. False:
    /// another process's stream holds it through another coordinator.
    pub(super) async fn claim_stream(
        &self,
        worker_id: &str,
        instance: Instance,
        conn: u64,
    ) -> Result<bool> {
        let claim = StreamClaim {
            worker_id,
            instance: instance.0,
            coordinator: &self.id,
            stream: conn,
        };
        self.store
            .worker_streams()
            .claim(&claim, self.stream_ttl_ms())
            .await
    }

    /// Releases stream `conn`'s claim of `worker_id` in the background
    /// (a stream ends in a `Drop`). Not while shutting down: the server
    /// releases every claim at once after the last stream ended.
    pub(super) fn release_stream(&self, worker_id: &str, conn: u64) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, coordinator, worker_id) =
            (self.store.clone(), self.id.clone(), worker_id.to_string());
        runtime.spawn(async move {
            let coordinator = coordinator.as_str();
            let claim = StreamClaim {
                worker_id: &worker_id,
                instance: 0,
                coordinator,
                stream: conn,
            };
            if let Err(e) = store.worker_streams().release(&claim).await {
                tracing::warn!(worker_id, error = %e, "releasing an ended worker stream's claim of its worker id failed; other processes with that id are refused until this coordinator stops");
            }
        });
    }

    /// How long this coordinator's claims outlive its last renewal: three
    /// heartbeat intervals, as a worker's own silence (registry,
    /// "Eligibility"). A killed coordinator's worker ids are free for other
    /// processes that long after; the same process moves at once.
    fn stream_ttl_ms(&self) -> i64 {
        (3 * self.timing.heartbeat_interval.as_millis()).min(i64::MAX as u128) as i64
    }

    /// Keeps this coordinator's claims alive. Should they have lapsed
    /// (renewals failed for a while), a stream whose worker id another
    /// coordinator took meanwhile is closed: one live stream per id holds
    /// again. Returns how many it closed.
    pub async fn renew_stream_claims(&self) -> Result<usize> {
        // Before the read: a stream confirmed later is not in it.
        let ours = self.registry.claimed();
        let ttl_ms = self.stream_ttl_ms();
        let Some(held) = self.store.worker_streams().renew(&self.id, ttl_ms).await? else {
            return Ok(0);
        };
        let held: HashSet<(String, u64)> =
            held.into_iter().map(|h| (h.worker_id, h.stream)).collect();
        let mut closed = 0;
        for (worker_id, conn) in &ours {
            if !held.contains(&(worker_id.clone(), *conn)) {
                // Dropping its sender ends the stream.
                self.registry.disconnect(worker_id, *conn);
                closed += 1;
            }
        }
        if !ours.is_empty() {
            tracing::warn!(
                streams = ours.len(),
                closed,
                ttl_ms,
                "this coordinator's claims of its worker streams had lapsed (no renewal for the ttl); renewed them, closing the streams whose worker ids another coordinator took meanwhile"
            );
        }
        Ok(closed)
    }

    /// Releases this coordinator's claims of worker ids (shutdown, once
    /// every stream ended): other processes may take them at once.
    pub async fn release_stream_claims(&self) -> Result<()> {
        self.store.worker_streams().retire(&self.id).await
    }
}

/// A stream registered but not yet confirmed: dropped, it is undone (here
/// and its claim, which may have committed) unless
/// [`confirmed`](Pending::confirmed).
pub(super) struct Pending<'a> {
    pub core: &'a Coordinator,
    pub worker_id: &'a str,
    pub conn: u64,
}

impl Pending<'_> {
    /// The stream stays.
    pub fn confirmed(self) {
        std::mem::forget(self);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.core.unsubscribe(self.worker_id, self.conn);
    }
}

/// A Subscribe for a worker id whose stream is open, on this coordinator
/// or another.
pub(super) fn stream_taken(worker_id: &str) -> Error {
    Error::AlreadyExists(format!(
        "worker {worker_id:?} is connected already (its Subscribe stream is open); \
         a worker id has one stream at a time: give this process an id of its own, or \
         resubscribe once the other stream has closed"
    ))
}
