//! Lease secrets, on both backends: a report or heartbeat that names a live
//! fencing token `(task id, attempt)` with the wrong secret — a guess, or
//! none at all (0, as an older worker sends) — is answered exactly like a
//! stale token and changes nothing but the ReportRejected event.

mod support;

use support::contract::*;

use stagecoach_coordinator::domain::{
    Assignment, EventKind, Failure, LeaseSecret, LeaseStatus, ReportAck, StageState,
};
use stagecoach_coordinator::error::Error;
use stagecoach_coordinator::store::{Report, Store};

/// The wrong secrets an attacker can send: none, and a guess.
fn forged(a: &Assignment) -> [LeaseSecret; 2] {
    [LeaseSecret(0), LeaseSecret(a.secret.0 ^ 1)]
}

fn fail_as(a: &Assignment, secret: LeaseSecret, retryable: bool) -> Failure {
    Failure {
        lease: a.lease,
        secret,
        error: "forged".into(),
        retryable,
    }
}

fn status_as(a: &Assignment, secret: LeaseSecret) -> LeaseStatus {
    LeaseStatus {
        lease: a.lease,
        secret,
        done: 9,
        total: 9,
        checkpoint: Some(b"forged".to_vec()),
    }
}

/// What a forged report could have changed: the migration, its stages'
/// counters and states, and the worker's live leases.
async fn snapshot(s: &dyn Store, migration_id: i64) -> String {
    let m = s.get_migration(migration_id).await.unwrap().unwrap();
    let mut leases = s.live_leases(W).await.unwrap();
    leases.sort();
    format!("{m:?} {leases:?}")
}

/// Every lease gets its own secret, never 0, and a new lease of the same
/// task a new one.
async fn every_lease_gets_a_fresh_nonzero_secret(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (_, a) = first_stage_claimed(s, 4).await;
    assert!(a.iter().all(|a| a.secret != LeaseSecret(0)));
    let mut secrets: Vec<u64> = a.iter().map(|a| a.secret.0).collect();
    secrets.sort_unstable();
    secrets.dedup();
    assert_eq!(secrets.len(), 4, "four leases, four secrets");

    s.fail(W, &fail_as(&a[0], a[0].secret, true)).await.unwrap();
    // The retry's backoff is short in the default policy; wait it out.
    let again = loop {
        let got = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
        if let Some(x) = got.into_iter().next() {
            break x;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        (again.lease.task_id, again.lease.attempt),
        (a[0].lease.task_id, 2)
    );
    assert!(again.secret != a[0].secret && again.secret != LeaseSecret(0));
    // The first attempt's secret does not make its token live again, nor
    // does the live secret make the old attempt's token live.
    let old = s.complete(W, &done(&a[0])).await.unwrap_err();
    assert!(matches!(old, Error::LeaseNotHeld(_)), "{old}");
    let mixed = s
        .complete(W, &done_as(a[0].lease, again.secret))
        .await
        .unwrap_err();
    assert!(matches!(mixed, Error::LeaseNotHeld(_)), "{mixed}");
    s.complete(W, &done(&again)).await.unwrap();
}

/// Complete, Fail and Heartbeat with a live token and a wrong secret, by the
/// very worker that holds the lease: each is refused as stale, in the words
/// of a stale token, nothing changes, and the real holder's reports still
/// count.
async fn a_forged_secret_is_rejected_like_a_stale_token_and_changes_nothing(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (c, a) = first_stage_claimed(s, 2).await;
    let before = snapshot(s, c.migration_id).await;

    for secret in forged(&a[0]) {
        let err = s
            .complete(W, &done_as(a[0].lease, secret))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LeaseNotHeld(_)), "{err}");
        assert!(err.to_string().contains("no longer held"), "{err}");
        assert!(
            !err.to_string().contains("secret"),
            "says which part: {err}"
        );
        for retryable in [true, false] {
            let err = s.fail(W, &fail_as(&a[0], secret, retryable)).await;
            let err = err.unwrap_err();
            assert!(matches!(err, Error::LeaseNotHeld(_)), "{err}");
            assert!(err.to_string().contains("no longer held"), "{err}");
        }
        let hb = s.heartbeat(W, &[status_as(&a[0], secret)]).await.unwrap();
        assert!(hb.renewed.is_empty(), "a forged heartbeat renewed: {hb:?}");
        assert_eq!(hb.cancel.len(), 1, "{hb:?}");
        assert!(hb.cancel[0].1.contains("no longer held"), "{hb:?}");
    }
    assert_eq!(
        snapshot(s, c.migration_id).await,
        before,
        "a forgery changed something"
    );
    let events = s.list_events(c.migration_id, 0, 1000).await.unwrap();
    let rejected = events
        .iter()
        .filter(|e| e.kind == EventKind::ReportRejected)
        .count();
    assert_eq!(rejected, 6, "each forged report is logged as rejected");
    let secret = a[0].secret.0 as i64;
    assert!(
        events
            .iter()
            .all(|e| !e.message.contains(&secret.to_string())
                && !e.message.contains(&a[0].secret.0.to_string())),
        "an event shows the secret: {events:?}"
    );

    // The holder's own heartbeat, failure and completion still apply.
    let hb = s
        .heartbeat(W, &[status_as(&a[0], a[0].secret)])
        .await
        .unwrap();
    assert_eq!((hb.renewed.len(), hb.cancel.len()), (1, 0), "{hb:?}");
    s.complete(W, &done(&a[0])).await.unwrap();
    // A forged repeat of a recorded outcome is no duplicate: rejected.
    let repeat = s.complete(W, &done_as(a[0].lease, LeaseSecret(0))).await;
    assert!(matches!(repeat, Err(Error::LeaseNotHeld(_))), "{repeat:?}");
    let (ack, _) = s.complete(W, &done(&a[0])).await.unwrap();
    assert_eq!(ack, ReportAck::Duplicate);
    s.fail(W, &fail_as(&a[1], a[1].secret, false))
        .await
        .unwrap();
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!((m.stages[0].succeeded, m.stages[0].failed), (1, 1), "{m:?}");
}

/// The group commit's set-at-a-time path checks the secret too: in one
/// batch, forged completions of live leases are rejected while the real
/// ones beside them are recorded, and the stage counts only those.
async fn a_batch_records_the_real_completions_and_rejects_the_forged(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let (c, a) = first_stage_claimed(s, 4).await;
    let report =
        |x: &Assignment, secret| (W.to_string(), Report::Complete(done_as(x.lease, secret)));
    let batch = [
        report(&a[0], a[0].secret),
        report(&a[1], LeaseSecret(0)),
        report(&a[2], LeaseSecret(a[2].secret.0.wrapping_add(1))),
        report(&a[3], a[3].secret),
    ];
    let (results, _) = s.report_and_claim(&batch, &[]).await.unwrap();
    assert!(results[0].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(Error::LeaseNotHeld(_))),
        "{results:?}"
    );
    assert!(
        matches!(results[2], Err(Error::LeaseNotHeld(_))),
        "{results:?}"
    );
    assert!(results[3].is_ok(), "{results:?}");
    let m = s.get_migration(c.migration_id).await.unwrap().unwrap();
    assert_eq!(
        (m.stages[0].succeeded, m.stages[0].state, m.stages[1].state),
        (2, StageState::Running, StageState::Pending)
    );
    let mut leased = s.live_leases(W).await.unwrap();
    leased.sort();
    assert_eq!(
        leased,
        [a[1].lease, a[2].lease],
        "the forged ones are still leased"
    );

    // Their holder finishes them; the next stage starts.
    complete_as_one_batch(s, [&a[1], &a[2]]).await;
    let next = s.claim(W, &kinds(&["noop"]), 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].stage_name, "b");
}

on_both_backends!(
    every_lease_gets_a_fresh_nonzero_secret,
    a_forged_secret_is_rejected_like_a_stale_token_and_changes_nothing,
    a_batch_records_the_real_completions_and_rejects_the_forged,
);
