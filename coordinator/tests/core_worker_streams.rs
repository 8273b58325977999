//! One live Subscribe stream per worker id across coordinators, through the
//! scheduling core on both backends: two cores on one store are two
//! coordinators on one database (each draws its own id). A refused stream
//! leaves nothing behind — no registry entry, no stream place, no claim —
//! and neither does a Subscribe its caller abandons mid-claim; a
//! coordinator whose claims lapsed closes the streams whose ids another
//! took meanwhile.

mod support;

use support::contract::*;

use std::sync::Arc;
use std::time::Duration;

use stagecoach_coordinator::domain::RequestLimits;
use stagecoach_coordinator::engine::{Coordinator, Instance, Timing, WorkerSpec};
use stagecoach_coordinator::error::Error;
use stagecoach_coordinator::store::Store;
use tokio_util::sync::CancellationToken;

/// A coordinator on `store` whose workers heartbeat every `heartbeat`
/// (its claims last three of these) and that holds `streams` streams.
fn core(store: &Arc<dyn Store>, heartbeat: Duration, streams: usize) -> Arc<Coordinator> {
    let timing = Timing {
        heartbeat_interval: heartbeat,
        lease_duration: Duration::from_secs(60),
        sweep_interval: Duration::from_secs(60),
    };
    let limits = RequestLimits {
        max_worker_streams: streams,
        ..RequestLimits::default()
    };
    Coordinator::with_limits(store.clone(), timing, limits, CancellationToken::new())
}

fn spec(id: &str) -> WorkerSpec {
    WorkerSpec {
        worker_id: id.into(),
        name: String::new(),
        kinds: vec!["noop".into()],
        slots: 1,
    }
}

fn listed(core: &Coordinator) -> Vec<String> {
    core.workers()
        .list()
        .into_iter()
        .map(|w| w.spec.worker_id)
        .collect()
}

const LONG: Duration = Duration::from_secs(60);

/// Refused on B while A streams it: ALREADY_EXISTS, and B keeps nothing of
/// it (its only stream place is free again); the same process moves.
async fn a_stream_refused_by_the_database_leaves_nothing(b: Backend) {
    let db = store(b).await;
    let (a, b) = (core(&db.store, LONG, 10), core(&db.store, LONG, 1));
    let (_conn, _stream) = a.subscribe(spec("w"), Instance(1)).await.unwrap();
    for instance in [Instance(2), Instance(0)] {
        match b.subscribe(spec("w"), instance).await {
            Err(Error::AlreadyExists(m)) => assert!(m.contains("connected already"), "{m}"),
            other => panic!("wanted ALREADY_EXISTS, got {other:?}"),
        }
    }
    assert!(listed(&b).is_empty());
    let (conn, _other) = b.subscribe(spec("other"), Instance(3)).await.unwrap();
    assert_eq!(listed(&b), ["other"], "the refused ones freed their place");
    b.unsubscribe("other", conn);
    let (_conn, _moved) = b.subscribe(spec("w"), Instance(1)).await.unwrap();
    assert_eq!(listed(&b), ["w"], "the same process moves at once");
}

/// A Subscribe dropped while its claim runs is undone: its place, its
/// entry and its claim (another process may take the id on another
/// coordinator).
async fn an_abandoned_subscribe_leaves_nothing(b: Backend) {
    let db = store(b).await;
    let (a, b) = (core(&db.store, LONG, 1), core(&db.store, LONG, 1));
    loop {
        // A zero timeout polls the call once: it drops it at its first wait.
        let call = tokio::time::timeout(Duration::ZERO, a.subscribe(spec("w"), Instance(1)));
        match call.await {
            Err(_elapsed) => break,
            // It never waited: not this case; try again.
            Ok(done) => a.unsubscribe("w", done.unwrap().0),
        }
    }
    assert!(listed(&a).is_empty());
    let (_conn, _stream) = a.subscribe(spec("x"), Instance(2)).await.unwrap();
    // Its claim is released in the background.
    let mut tries = 0;
    while let Err(e) = b.subscribe(spec("w"), Instance(3)).await {
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        tries += 1;
        assert!(tries < 100, "w's claim was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A's claims lapse (no renewal for three heartbeats); B takes one of its
/// ids; A's next renewal closes that stream and keeps the other.
async fn a_lapsed_coordinator_closes_the_streams_it_lost(b: Backend) {
    let db = store(b).await;
    let a = core(&db.store, Duration::from_millis(20), 10);
    let b = core(&db.store, LONG, 10);
    let (_w, mut lost) = a.subscribe(spec("w"), Instance(1)).await.unwrap();
    let (_v, mut kept) = a.subscribe(spec("v"), Instance(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_conn, _taken) = b.subscribe(spec("w"), Instance(2)).await.unwrap();

    assert_eq!(a.renew_stream_claims().await.unwrap(), 1);
    assert_eq!(listed(&a), ["v"]);
    assert!(lost.recv().await.is_none(), "w's stream on A ended");
    assert!(kept.try_recv().is_err() && !kept.is_closed());
    assert_eq!(a.renew_stream_claims().await.unwrap(), 0, "alive again");
    match b.subscribe(spec("v"), Instance(2)).await {
        Err(Error::AlreadyExists(_)) => {}
        other => panic!("A holds v again: {other:?}"),
    }
}

on_both_backends!(
    a_stream_refused_by_the_database_leaves_nothing,
    an_abandoned_subscribe_leaves_nothing,
    a_lapsed_coordinator_closes_the_streams_it_lost,
);
