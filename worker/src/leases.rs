//! The leases this worker holds: one entry per running (or still reporting)
//! attempt, with its cancel token, its recorded progress and when it was last
//! renewed.
//!
//! The table is the one piece of state the subscription loop, the heartbeat
//! loop and the task runners share. It sits behind a `std` mutex on purpose:
//! every critical section is a few map operations and never awaits.
//!
//! Times here are the worker's monotonic clock. A lease counts from the
//! instant the worker *sent* the request that granted or renewed it, which is
//! never later than the coordinator's own start of the lease, so the worker's
//! idea of the expiry is never later than the coordinator's, whatever the
//! wall clocks say.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use stagecoach_proto::v1::{LeaseStatus, LeaseToken};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::handler::{SharedProgress, lock};

/// The coordinator's timing settings, from its `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub(crate) heartbeat_interval: Duration,
    pub(crate) lease_duration: Duration,
}

impl Timing {
    /// Reads a `Welcome`, filling in sane values for zeros so a
    /// misconfigured coordinator cannot make the worker spin.
    pub(crate) fn from_welcome(heartbeat_interval_ms: u32, lease_duration_ms: u32) -> Self {
        let lease_duration = match lease_duration_ms {
            0 => Duration::from_secs(30),
            ms => Duration::from_millis(ms.into()),
        };
        let heartbeat_interval = match heartbeat_interval_ms {
            0 => lease_duration / 3,
            ms => Duration::from_millis(ms.into()),
        }
        .max(Duration::from_millis(10));
        Self {
            heartbeat_interval,
            lease_duration,
        }
    }
}

/// How long the worker itself trusts a lease of `duration` after a renewal:
/// a fifth less than the coordinator does, so a handler is told to stop
/// before the coordinator can give its task to someone else.
fn local(duration: Duration) -> Duration {
    duration - duration / 5
}

/// Why a lease ended while its entry still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The coordinator said it is no longer held (a cancel notice).
    Revoked(String),
    /// Not renewed within the local lease; the coordinator may still hold it
    /// for a short while.
    Expired,
}

/// What the reporter may do with a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReportState {
    /// Keep trying to report.
    Live,
    /// Drop the report; it would be rejected.
    Gone(String),
}

struct Lease {
    /// The assignment's `lease_secret`, echoed in every heartbeat and report.
    secret: u64,
    cancel: CancellationToken,
    progress: SharedProgress,
    renewed_at: Instant,
    /// The lease's own heartbeat timeout, when its assignment named one;
    /// otherwise the coordinator's lease duration.
    duration: Option<Duration>,
    ended: Option<Ended>,
}

impl Lease {
    fn duration(&self, timing: Timing) -> Duration {
        self.duration.unwrap_or(timing.lease_duration)
    }
}

/// A lease as the heartbeat loop sends it.
pub(crate) struct HeartbeatEntry {
    pub(crate) status: LeaseStatus,
    pub(crate) checkpoint_version: u64,
}

#[derive(Default)]
pub(crate) struct LeaseTable {
    leases: Mutex<HashMap<LeaseToken, Lease>>,
}

impl LeaseTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<LeaseToken, Lease>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new lease granted by a request sent at `granted_at`, lasting
    /// `duration` after each renewal (`None`: the coordinator's default);
    /// false if the worker already holds it (a repeated assignment).
    #[cfg(test)]
    pub(crate) fn insert(
        &self,
        token: LeaseToken,
        cancel: CancellationToken,
        progress: SharedProgress,
        granted_at: Instant,
        duration: Option<Duration>,
    ) -> bool {
        self.insert_lease(token, 0, cancel, progress, granted_at, duration)
    }

    /// Adds the lease of a new assignment, with its secret; false if the
    /// lease is held already (a repeated assignment).
    pub(crate) fn insert_lease(
        &self,
        token: LeaseToken,
        secret: u64,
        cancel: CancellationToken,
        progress: SharedProgress,
        granted_at: Instant,
        duration: Option<Duration>,
    ) -> bool {
        let mut leases = self.lock();
        if leases.contains_key(&token) {
            return false;
        }
        leases.insert(
            token,
            Lease {
                secret,
                cancel,
                progress,
                renewed_at: granted_at,
                duration,
                ended: None,
            },
        );
        true
    }

    pub(crate) fn remove(&self, token: LeaseToken) {
        self.lock().remove(&token);
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The coordinator no longer holds the lease for us: stop its handler.
    /// False if the worker does not know the lease.
    pub(crate) fn revoke(&self, token: LeaseToken, reason: &str) -> bool {
        let mut leases = self.lock();
        let Some(lease) = leases.get_mut(&token) else {
            return false;
        };
        lease.ended = Some(Ended::Revoked(reason.to_string()));
        lease.cancel.cancel();
        true
    }

    /// Cancels every handler (shutdown past the drain bound).
    pub(crate) fn cancel_all(&self) {
        for lease in self.lock().values() {
            lease.cancel.cancel();
        }
    }

    /// Ends, and cancels the handlers of, every live lease not renewed within
    /// the local lease. Returns the leases it ended.
    pub(crate) fn expire_overdue(&self, now: Instant, timing: Timing) -> Vec<LeaseToken> {
        let mut expired = Vec::new();
        for (token, lease) in self.lock().iter_mut() {
            if lease.ended.is_none() && now >= lease.renewed_at + local(lease.duration(timing)) {
                lease.ended = Some(Ended::Expired);
                lease.cancel.cancel();
                expired.push(*token);
            }
        }
        expired
    }

    /// The secret of a held lease (0 once it is forgotten: a report then
    /// names no lease, and is refused like a stale one).
    pub(crate) fn secret(&self, token: LeaseToken) -> u64 {
        self.lock().get(&token).map_or(0, |l| l.secret)
    }

    /// Every lease still worth renewing, with its progress and, if not yet
    /// acknowledged, its latest checkpoint.
    pub(crate) fn heartbeat_entries(&self) -> Vec<HeartbeatEntry> {
        self.lock()
            .iter()
            .filter(|(_, lease)| lease.ended.is_none())
            .map(|(token, lease)| {
                let p = lock(&lease.progress);
                let unacked = p.checkpoint_version > p.acked_version;
                HeartbeatEntry {
                    status: LeaseStatus {
                        lease: Some(*token),
                        lease_secret: lease.secret,
                        done: p.done,
                        total: p.total,
                        checkpoint: p.checkpoint.clone().filter(|_| unacked),
                    },
                    checkpoint_version: p.checkpoint_version,
                }
            })
            .collect()
    }

    /// The coordinator renewed a lease in answer to a heartbeat sent at
    /// `sent_at` that carried checkpoint `checkpoint_version`.
    pub(crate) fn renewed(&self, token: LeaseToken, sent_at: Instant, checkpoint_version: u64) {
        if let Some(lease) = self.lock().get_mut(&token) {
            if lease.ended.is_none() {
                lease.renewed_at = lease.renewed_at.max(sent_at);
            }
            let mut p = lock(&lease.progress);
            p.acked_version = p.acked_version.max(checkpoint_version);
        }
    }

    /// Whether a report about `token` can still be accepted.
    pub(crate) fn report_state(
        &self,
        token: LeaseToken,
        now: Instant,
        timing: Timing,
    ) -> ReportState {
        let leases = self.lock();
        let Some(lease) = leases.get(&token) else {
            return ReportState::Gone("the worker no longer tracks it".into());
        };
        match &lease.ended {
            Some(Ended::Revoked(reason)) => {
                ReportState::Gone(format!("the coordinator revoked it: {reason}"))
            }
            // The coordinator's lease runs the full duration from the last
            // renewal; until then a report may still land.
            _ if now >= lease.renewed_at + lease.duration(timing) => {
                ReportState::Gone("it expired without being renewed".into())
            }
            _ => ReportState::Live,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(task_id: i64) -> LeaseToken {
        LeaseToken {
            task_id,
            attempt: 1,
        }
    }

    const TIMING: Timing = Timing {
        heartbeat_interval: Duration::from_secs(1),
        lease_duration: Duration::from_secs(10),
    };

    #[test]
    fn zero_timings_get_defaults() {
        let t = Timing::from_welcome(0, 0);
        assert_eq!(t.lease_duration, Duration::from_secs(30));
        assert_eq!(t.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(local(t.lease_duration), Duration::from_secs(24));
    }

    #[test]
    fn leases_expire_locally_before_the_coordinator_gives_up() {
        let table = LeaseTable::default();
        let cancel = CancellationToken::new();
        let start = Instant::now();
        assert!(table.insert(token(1), cancel.clone(), Default::default(), start, None));
        assert!(!table.insert(token(1), cancel.clone(), Default::default(), start, None));

        assert!(
            table
                .expire_overdue(start + Duration::from_secs(7), TIMING)
                .is_empty()
        );
        table.renewed(token(1), start + Duration::from_secs(5), 0);
        assert!(
            table
                .expire_overdue(start + Duration::from_secs(12), TIMING)
                .is_empty()
        );
        assert_eq!(
            table.expire_overdue(start + Duration::from_secs(13), TIMING),
            vec![token(1)]
        );
        assert!(cancel.is_cancelled());
        assert!(
            table.heartbeat_entries().is_empty(),
            "an ended lease is not renewed"
        );

        // Reports may still land until the coordinator's own expiry.
        assert_eq!(
            table.report_state(token(1), start + Duration::from_secs(14), TIMING),
            ReportState::Live
        );
        assert!(matches!(
            table.report_state(token(1), start + Duration::from_secs(15), TIMING),
            ReportState::Gone(_)
        ));
    }

    #[test]
    fn a_lease_with_its_own_heartbeat_timeout_expires_by_it() {
        let table = LeaseTable::default();
        let start = Instant::now();
        let short = Some(Duration::from_secs(2));
        table.insert(
            token(1),
            CancellationToken::new(),
            Default::default(),
            start,
            short,
        );
        table.insert(
            token(2),
            CancellationToken::new(),
            Default::default(),
            start,
            None,
        );
        // 2 s lease: trusted locally for 1.6 s, reportable until 2 s.
        assert!(
            table
                .expire_overdue(start + Duration::from_millis(1_500), TIMING)
                .is_empty()
        );
        assert_eq!(
            table.expire_overdue(start + Duration::from_millis(1_600), TIMING),
            vec![token(1)]
        );
        assert_eq!(
            table.report_state(token(1), start + Duration::from_millis(1_900), TIMING),
            ReportState::Live
        );
        assert!(matches!(
            table.report_state(token(1), start + Duration::from_secs(2), TIMING),
            ReportState::Gone(_)
        ));
        // The other lease keeps the coordinator's 10 s.
        assert_eq!(
            table.report_state(token(2), start + Duration::from_secs(5), TIMING),
            ReportState::Live
        );
    }

    #[tokio::test]
    async fn checkpoints_are_sent_until_acknowledged() {
        let table = LeaseTable::default();
        let progress = SharedProgress::default();
        table.insert(
            token(1),
            CancellationToken::new(),
            progress.clone(),
            Instant::now(),
            None,
        );
        {
            let mut p = lock(&progress);
            p.checkpoint = Some(b"cp".to_vec());
            p.checkpoint_version = 1;
        }
        let entries = table.heartbeat_entries();
        assert_eq!(entries[0].status.checkpoint.as_deref(), Some(&b"cp"[..]));
        table.renewed(token(1), Instant::now(), entries[0].checkpoint_version);
        assert_eq!(table.heartbeat_entries()[0].status.checkpoint, None);
    }

    #[tokio::test]
    async fn revoked_leases_drop_their_reports() {
        let table = LeaseTable::default();
        let cancel = CancellationToken::new();
        table.insert(
            token(2),
            cancel.clone(),
            Default::default(),
            Instant::now(),
            None,
        );
        assert!(table.revoke(token(2), "migration canceled"));
        assert!(cancel.is_cancelled());
        assert!(!table.revoke(token(3), "unknown"));
        assert!(matches!(
            table.report_state(token(2), Instant::now(), TIMING),
            ReportState::Gone(_)
        ));
    }
}
