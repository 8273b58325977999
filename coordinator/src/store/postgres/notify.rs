//! Effects across coordinators: `NOTIFY` in every transition's transaction,
//! `LISTEN` in [`listen`].
//!
//! A transition publishes its [`Effects`] with `pg_notify` inside its own
//! transaction, so PostgreSQL delivers them exactly when — and only if — the
//! transition commits. Each notice carries the publishing store's origin id;
//! a store skips its own notices, since it already applied those effects
//! locally. Notices are transient: whatever is published while a listener's
//! connection is down is lost, so after every reconnect the listener hands on
//! a synthetic "dispatch again" instead (cancel notices missed meanwhile still
//! reach their workers through heartbeat answers, I9).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::Result;
use crate::store::Effects;

/// The channel every coordinator of one database listens on.
pub(super) const CHANNEL: &str = "stagecoach_effects";

/// PostgreSQL refuses payloads of 8000 bytes or more; the margin covers the
/// few bytes by which [`payloads`] may underestimate a part.
const MAX_PAYLOAD: usize = 7_800;

/// One notification: whose transaction committed it, and what it did.
#[derive(serde::Serialize, serde::Deserialize)]
struct Notice<'a> {
    origin: &'a str,
    effects: Effects,
}

fn encode(origin: &str, effects: Effects) -> String {
    // Effects are plain numbers and strings: serialising them cannot fail.
    serde_json::to_string(&Notice { origin, effects }).unwrap_or_default()
}

/// The notification payloads of `fx`: one if it fits, else parts that each
/// fit and together carry every touched id, revoked lease and worker that
/// lost a lease. A revoked lease or lost worker too large for a
/// notification on its own (a worker id of kilobytes) is left out: its
/// worker still learns of a cancel from its next heartbeat answer, and a
/// lost worker is still dealt other tasks than the one it lost first (the
/// claim reads `expired_worker`).
pub(super) fn payloads(origin: &str, fx: &Effects) -> Vec<String> {
    if is_empty(fx) {
        return Vec::new();
    }
    let whole = encode(origin, fx.clone());
    if whole.len() < MAX_PAYLOAD {
        return vec![whole];
    }
    let empty = encode(
        origin,
        Effects {
            dispatch: true,
            ..Effects::default()
        },
    )
    .len();
    let mut parts = Vec::new();
    let mut part = Effects {
        dispatch: fx.dispatch,
        ..Effects::default()
    };
    let mut size = empty;
    let mut flush = |part: &mut Effects, size: &mut usize| {
        parts.push(encode(origin, std::mem::take(part)));
        *size = empty;
    };
    for id in &fx.touched {
        let more = id.to_string().len() + 1;
        if size + more >= MAX_PAYLOAD {
            flush(&mut part, &mut size);
        }
        part.touched.insert(*id);
        size += more;
    }
    for revoked in &fx.revoked {
        let more = serde_json::to_string(revoked).map_or(usize::MAX, |s| s.len() + 1);
        if empty.saturating_add(more) >= MAX_PAYLOAD {
            tracing::warn!(
                lease = %revoked.lease,
                "cancel notice too large to publish; its worker learns it from its next heartbeat"
            );
            continue;
        }
        if size + more >= MAX_PAYLOAD {
            flush(&mut part, &mut size);
        }
        part.revoked.push(revoked.clone());
        size += more;
    }
    // `"lost":[…]` the first time in a part, then `,"id"` each.
    let lost_key = r#","lost":[]"#.len();
    for worker in &fx.lost {
        let more = serde_json::to_string(worker).map_or(usize::MAX, |s| s.len() + 1);
        if empty.saturating_add(lost_key).saturating_add(more) >= MAX_PAYLOAD {
            continue;
        }
        if size + lost_key + more >= MAX_PAYLOAD {
            flush(&mut part, &mut size);
        }
        if part.lost.is_empty() {
            size += lost_key;
        }
        size += more;
        part.lost.insert(worker.clone());
    }
    if !is_empty(&part) {
        flush(&mut part, &mut size);
    }
    parts
}

/// Whether `fx` says nothing another coordinator would act on.
fn is_empty(fx: &Effects) -> bool {
    fx.touched.is_empty() && fx.revoked.is_empty() && fx.lost.is_empty() && !fx.dispatch
}

/// Publishes `fx` in the caller's transaction: delivered at its commit.
pub(super) async fn publish(conn: &mut PgConnection, origin: &str, fx: &Effects) -> Result<()> {
    for payload in payloads(origin, fx) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Publishes `fx` and commits: the end of every transition that has effects.
pub(super) async fn commit(
    mut tx: Transaction<'static, Postgres>,
    origin: &str,
    fx: &Effects,
) -> Result<()> {
    publish(&mut tx, origin, fx).await?;
    tx.commit().await?;
    Ok(())
}

/// [`commit`] for a transaction that published `early` already, from a
/// statement of its own work (see `bulk::complete_live`): `fx` goes out
/// too only if it says something `early` did not, so the common case
/// spares a round trip.
pub(super) async fn commit_after(
    tx: Transaction<'static, Postgres>,
    origin: &str,
    fx: &Effects,
    early: &Effects,
) -> Result<()> {
    let said = fx.touched.is_subset(&early.touched)
        && fx.revoked.iter().all(|r| early.revoked.contains(r))
        && fx.lost.is_subset(&early.lost)
        && (early.dispatch || !fx.dispatch);
    if said {
        tx.commit().await?;
        Ok(())
    } else {
        commit(tx, origin, fx).await
    }
}

/// Starts listening and returns the effects other stores commit, decoded.
/// Returns once `LISTEN` is in place: nothing committed after that is missed
/// unless the connection drops.
pub(super) async fn listen(
    options: PgConnectOptions,
    origin: String,
) -> Result<UnboundedReceiver<Effects>> {
    let listener = subscribe(&options).await?;
    let (tx, rx) = unbounded_channel();
    tokio::spawn(forward(listener, options, origin, tx));
    Ok(rx)
}

async fn subscribe(options: &PgConnectOptions) -> Result<PgListener, sqlx::Error> {
    // A connection of its own, outside the store's pool: it is held for as
    // long as the coordinator runs, and PgListener reconnects through it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// What a listener hands on when notifications may have been missed.
fn missed() -> Effects {
    Effects {
        dispatch: true,
        ..Effects::default()
    }
}

fn decode(payload: &str, own: &str) -> Option<Effects> {
    match serde_json::from_str::<Notice<'_>>(payload) {
        Ok(notice) if notice.origin == own => None,
        Ok(notice) => Some(notice.effects),
        Err(e) => {
            // A coordinator of another version, perhaps: wake up to be safe.
            tracing::warn!(error = %e, "undecodable notification on {CHANNEL}");
            Some(missed())
        }
    }
}

/// Forwards notices until the receiver is dropped.
async fn forward(
    mut listener: PgListener,
    options: PgConnectOptions,
    origin: String,
    tx: UnboundedSender<Effects>,
) {
    loop {
        let received = tokio::select! {
            r = listener.try_recv() => r,
            () = tx.closed() => return,
        };
        let fx = match received {
            Ok(Some(notice)) => match decode(notice.payload(), &origin) {
                Some(fx) => fx,
                None => continue,
            },
            // PgListener lost its connection and has already reconnected.
            Ok(None) => {
                tracing::warn!("the LISTEN connection dropped and was re-established");
                missed()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the LISTEN connection failed; reconnecting");
                drop(listener);
                listener = match resubscribe(&options, &tx).await {
                    Some(l) => l,
                    None => return,
                };
                missed()
            }
        };
        if tx.send(fx).is_err() {
            return;
        }
    }
}

/// Connects a new listener, with capped backoff, until it works or nobody
/// receives any more.
async fn resubscribe(
    options: &PgConnectOptions,
    tx: &UnboundedSender<Effects>,
) -> Option<PgListener> {
    let mut delay = Duration::from_millis(100);
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return None,
        }
        match subscribe(options).await {
            Ok(listener) => {
                tracing::info!("LISTEN connection re-established");
                return Some(listener);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not re-establish the LISTEN connection");
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LeaseToken, Revoked};

    fn revoked(n: i64) -> Revoked {
        Revoked {
            worker_id: format!("worker-{n}"),
            lease: LeaseToken {
                task_id: n,
                attempt: 1,
            },
            reason: "migration canceled".into(),
        }
    }

    #[test]
    fn small_effects_are_one_notice_and_own_notices_are_skipped() {
        let mut fx = Effects::default();
        fx.touched.insert(7);
        fx.revoked.push(revoked(1));
        let p = payloads("me", &fx);
        assert_eq!(p.len(), 1);
        assert_eq!(decode(&p[0], "other"), Some(fx));
        assert_eq!(decode(&p[0], "me"), None);
        assert!(payloads("me", &Effects::default()).is_empty());
    }

    #[test]
    fn a_lost_worker_travels_and_older_notices_without_one_still_decode() {
        let mut fx = Effects::default();
        fx.lost.insert("w1".into());
        let p = payloads("me", &fx);
        assert_eq!(p.len(), 1, "a lost worker alone is worth a notice");
        assert_eq!(decode(&p[0], "other"), Some(fx));
        let older = r#"{"origin":"old","effects":{"touched":[3],"revoked":[],"dispatch":true}}"#;
        let fx = decode(older, "me").unwrap();
        assert!(fx.lost.is_empty() && fx.dispatch);
        assert!(
            !payloads("me", &missed())[0].contains("lost"),
            "no empty list on the wire"
        );
    }

    #[test]
    fn large_effects_are_split_into_parts_that_fit_and_lose_nothing() {
        let mut fx = Effects {
            dispatch: true,
            ..Effects::default()
        };
        for n in 0..3_000 {
            fx.touched.insert(1_000_000 + n);
            fx.revoked.push(revoked(n));
            fx.lost.insert(format!("worker-{n}"));
        }
        let parts = payloads("origin-id", &fx);
        assert!(parts.len() > 10);
        let mut merged = Effects::default();
        for p in &parts {
            assert!(p.len() < 8000, "{}", p.len());
            let part = decode(p, "someone else").unwrap();
            merged.touched.extend(part.touched);
            merged.revoked.extend(part.revoked);
            merged.lost.extend(part.lost);
            merged.dispatch |= part.dispatch;
        }
        assert_eq!(merged, fx);
    }

    #[test]
    fn a_cancel_notice_too_large_for_any_notice_is_left_to_the_heartbeat() {
        let mut fx = Effects::default();
        let mut huge = revoked(1);
        huge.worker_id = "w".repeat(9_000);
        fx.revoked.push(huge);
        fx.revoked.push(revoked(2));
        let parts = payloads("o", &fx);
        assert_eq!(parts.len(), 1);
        assert_eq!(decode(&parts[0], "x").unwrap().revoked, vec![revoked(2)]);
    }
}
