//! The coordinator's two background loops. Both are `select!` on a wake-up
//! (or tick) and the shutdown token, and do one pass at a time.
//!
//! Work is pushed, not polled: a commit that makes tasks ready wakes the
//! dispatcher at once; the dispatcher's tick is only a safety net, and the
//! sweeper's tick is the only timer that finds expired leases, due retries
//! and deadlines. A batch of reports runs its own dispatch pass in its
//! transaction (`Coordinator::commit_reports`), so the hot path of
//! finish-one-start-the-next needs no wake-up at all, and so does a create
//! whose migration is admitted at once; `claim_requests` and `deliver` are
//! shared by all three.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::registry::Eligible;
use super::{Coordinator, WorkerEvent};
use crate::domain::{Assignment, SweepReport};
use crate::store::{ClaimRequest, Pass};

/// Hands ready tasks to eligible workers until shutdown.
pub async fn run_dispatcher(core: Arc<Coordinator>, shutdown: CancellationToken) {
    let mut tick =
        tokio::time::interval(core.timing.sweep_interval.max(Duration::from_millis(100)) * 4);
    loop {
        tokio::select! {
            _ = core.wake.notified() => {}
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = dispatch_once(&core).await {
            tracing::error!(error = %e, "dispatch pass failed; retrying on the next wake-up");
            tokio::time::sleep(Duration::from_millis(200)).await;
            core.wake.notify_one();
        }
    }
}

/// One dispatch pass: every eligible worker claims up to its free slots, all
/// in one store call (one transaction). Returns how many tasks
/// were assigned.
pub async fn dispatch_once(core: &Coordinator) -> crate::error::Result<usize> {
    let (workers, requests) = claim_requests(core);
    if workers.is_empty() {
        return Ok(0);
    }
    let pass = core.store.claim_many(&requests).await?;
    if pass.partial {
        // Ready tasks were held by another transaction: look again (the
        // next pass waits for it).
        core.wake.notify_one();
    }
    deliver(core, &workers, pass.claimed).await
}

/// The workers that may get work now, and their claims.
pub(super) fn claim_requests(core: &Coordinator) -> (Vec<Eligible>, Vec<ClaimRequest>) {
    // Stream open, not draining, heard from within three heartbeat
    // intervals and not since lost a lease (registry module doc).
    let workers = core.registry.eligible();
    let requests = workers
        .iter()
        .map(|w| ClaimRequest {
            worker_id: w.spec.worker_id.clone(),
            kinds: w.spec.kinds.clone(),
            slots: w.spec.slots,
        })
        .collect();
    (workers, requests)
}

/// Sends each worker its claimed assignments; a lease whose worker went
/// away since the claim goes back to `ready` at once. Returns how many were
/// sent.
pub(super) async fn deliver(
    core: &Coordinator,
    workers: &[Eligible],
    claimed: Vec<Vec<Assignment>>,
) -> crate::error::Result<usize> {
    let mut assigned = 0;
    let mut touched = BTreeSet::new();
    for (worker, batch) in workers.iter().zip(claimed) {
        let worker_id = &worker.spec.worker_id;
        core.metrics
            .assigned(worker_id, batch.iter().map(|a| a.lease));
        for a in batch {
            let (lease, migration_id) = (a.lease, a.migration_id);
            touched.insert(migration_id);
            if worker.tx.send(WorkerEvent::Assign(a)).is_err() {
                // The stream closed between the claim and the send: give the
                // task back at once instead of waiting for the lease to expire.
                core.metrics.released(worker_id, lease);
                let fx = core.store.release(worker_id, lease).await?;
                core.apply(fx);
            } else {
                assigned += 1;
            }
        }
    }
    for id in touched {
        let _ = core.changes.send(id);
    }
    Ok(assigned)
}

/// Whether a pass run inside another commit did the dispatcher's job: it ran
/// for every eligible worker and left nothing behind. Tasks it could not
/// place wait for a slot to free, which is another commit.
pub(super) fn pass_settles(workers: &[Eligible], pass: Option<&Pass>) -> bool {
    !workers.is_empty() && pass.is_some_and(|p| !p.partial)
}

/// Delivers a pass another commit ran (a report batch's, a create's): its
/// caller has answered already, so a failure is only logged — the leases
/// expire and are reassigned.
pub(super) async fn deliver_pass(
    core: &Coordinator,
    workers: &[Eligible],
    claimed: Vec<Vec<Assignment>>,
) {
    if let Err(e) = deliver(core, workers, claimed).await {
        tracing::error!(error = %e, "handing out claimed tasks failed; the leases expire and are reassigned");
    }
}

/// Sweeps expired leases, due retries and deadlines until shutdown.
pub async fn run_sweeper(core: Arc<Coordinator>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(core.timing.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match core.store.sweep().await {
            Ok((report, fx)) => {
                core.metrics.swept(&report);
                if report != SweepReport::default() {
                    tracing::info!(?report, "sweep");
                }
                core.apply(fx);
            }
            Err(e) => tracing::error!(error = %e, "sweep failed; trying again on the next tick"),
        }
    }
}

/// Applies effects other coordinators committed (shared PostgreSQL) until
/// shutdown or until the store's notification channel closes.
pub async fn run_remote_effects(
    core: Arc<Coordinator>,
    mut remote: tokio::sync::mpsc::UnboundedReceiver<crate::store::Effects>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            fx = remote.recv() => match fx {
                Some(fx) => core.apply(fx),
                None => return,
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Renews this coordinator's claims of its streams' worker ids every
/// heartbeat interval until shutdown (`Coordinator::renew_stream_claims`).
/// A failed renewal is logged and the streams keep running: the claims
/// outlive a renewal by three intervals, and a lapse is repaired by the
/// next renewal that works.
pub async fn run_stream_claims(core: Arc<Coordinator>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(core.timing.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = core.renew_stream_claims().await {
            tracing::error!(error = %e, "renewing the claims of this coordinator's worker streams failed; trying again on the next tick");
        }
    }
}
