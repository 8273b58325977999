//! The heartbeat loop: renews every held lease, carries progress and
//! checkpoints, stops the handlers the coordinator names, and ends leases
//! locally when renewals stop coming.
//!
//! It is independent of the Subscribe stream on purpose: while the stream is
//! down and being reconnected, running tasks keep their leases as long as the
//! coordinator answers heartbeats. A heartbeat goes out even with no leases,
//! because that keeps the worker "recent" and so eligible for new work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::leases::Timing;
use crate::run::Runtime;

/// What the loop did, logged when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeartbeatStats {
    pub(crate) sent: u64,
    pub(crate) failed: u64,
    pub(crate) revoked: u64,
    pub(crate) expired: u64,
}

/// Runs until `stop` is cancelled. Waits for the first `Welcome` so it
/// knows the coordinator's timing.
pub(crate) async fn heartbeat_loop(rt: Arc<Runtime>, stop: CancellationToken) -> HeartbeatStats {
    let mut stats = HeartbeatStats::default();
    let mut timings = rt.watch_timing();
    let mut timing = loop {
        if let Some(timing) = *timings.borrow_and_update() {
            break timing;
        }
        tokio::select! {
            () = stop.cancelled() => return stats,
            changed = timings.changed() => if changed.is_err() { return stats },
        }
    };
    let (mut beat, mut sweep) = tickers(timing);
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = beat.tick() => {
                let result = beat_once(&rt, timing, &mut stats).await;
                let now_failing = result.is_err();
                match (result, failing) {
                    (Ok(()), true) => info!("heartbeats are answered again"),
                    (Ok(()), false) => {}
                    // Warn once per outage; the reconnect loop already warns
                    // on every attempt.
                    (Err(status), false) => warn!(
                        code = ?status.code(),
                        error = %status.message(),
                        "heartbeat failed; held leases end locally unless renewed soon"
                    ),
                    (Err(status), true) => {
                        debug!(code = ?status.code(), error = %status.message(), "heartbeat failed");
                    }
                }
                failing = now_failing;
            }
            _ = sweep.tick() => {
                for token in rt.leases.expire_overdue(Instant::now(), timing) {
                    stats.expired += 1;
                    warn!(task_id = token.task_id, attempt = token.attempt, "lease not renewed in time; canceling its handler");
                }
            }
            changed = timings.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(new) = *timings.borrow_and_update() && new != timing {
                    timing = new;
                    (beat, sweep) = tickers(timing);
                }
            }
        }
    }
    stats
}

fn tickers(timing: Timing) -> (Interval, Interval) {
    let mut beat = interval(timing.heartbeat_interval);
    // A slow heartbeat must not be followed by a burst of catch-up ones.
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Check expiries well within the local margin of the shortest lease the
    // coordinator grants (a fifth of two heartbeat intervals), so a handler
    // is told to stop close to its local expiry rather than a beat later.
    let mut sweep = interval(
        (timing.heartbeat_interval / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
    );
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    (beat, sweep)
}

/// Sends one heartbeat and applies the answer.
async fn beat_once(rt: &Runtime, timing: Timing, stats: &mut HeartbeatStats) -> Result<(), Status> {
    let entries = rt.leases.heartbeat_entries();
    let versions: HashMap<_, _> = entries
        .iter()
        .filter_map(|e| Some((e.status.lease?, e.checkpoint_version)))
        .collect();
    let statuses = entries.into_iter().map(|e| e.status).collect();
    let sent_at = Instant::now();
    // Never wait on one heartbeat past the next one's turn (but allow a
    // second for a coordinator under load when beats are very frequent).
    let deadline = timing.heartbeat_interval.max(Duration::from_secs(1));
    stats.sent += 1;
    match rt.coordinator.heartbeat(statuses, deadline).await {
        Ok(response) => {
            for renewal in &response.renewed {
                if let Some(token) = renewal.lease {
                    rt.leases
                        .renewed(token, sent_at, versions.get(&token).copied().unwrap_or(0));
                }
            }
            for notice in &response.cancel {
                if let Some(token) = notice.lease
                    && rt.leases.revoke(token, &notice.reason)
                {
                    stats.revoked += 1;
                    info!(task_id = token.task_id, attempt = token.attempt, reason = %notice.reason, "coordinator canceled a lease");
                }
            }
            Ok(())
        }
        Err(status) => {
            stats.failed += 1;
            Err(status)
        }
    }
}
