//! One live Subscribe stream per worker id across coordinators sharing a
//! database, on both backends: the store's record of which process streams
//! each worker id through which coordinator (`store::streams`). Two
//! coordinators are two ids on one store, as two processes on one database.

mod support;

use support::contract::*;

use stagecoach_coordinator::store::{HeldStream, Store, StreamClaim};

const A: &str = "coordinator-a";
const B: &str = "coordinator-b";
/// Long enough never to run out during a case.
const ALIVE: i64 = 60_000;
/// A coordinator enrolled with this is past its expiry at once.
const EXPIRED: i64 = -1_000;

fn on<'a>(coordinator: &'a str, worker_id: &'a str, instance: u64, stream: u64) -> StreamClaim<'a> {
    StreamClaim {
        worker_id,
        instance,
        coordinator,
        stream,
    }
}

async fn claims(s: &dyn Store, claim: StreamClaim<'_>, ttl_ms: i64) -> bool {
    s.worker_streams().claim(&claim, ttl_ms).await.unwrap()
}

/// A live stream's id is refused to another process through another
/// coordinator, even one that sent no instance; its own process moves
/// between coordinators at once, in both directions.
async fn another_process_is_refused_the_same_process_moves(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    assert!(claims(s, on(A, "w", 1, 10), ALIVE).await);
    assert!(
        !claims(s, on(B, "w", 2, 20), ALIVE).await,
        "another process"
    );
    assert!(!claims(s, on(B, "w", 0, 21), ALIVE).await, "no instance");
    assert!(
        claims(s, on(B, "w", 1, 22), ALIVE).await,
        "the same process"
    );
    assert!(!claims(s, on(A, "w", 2, 11), ALIVE).await, "B holds it now");
    assert!(claims(s, on(A, "w", 1, 12), ALIVE).await, "and back");

    // Instance 0 (a worker that sent none) proves nothing: never taken over.
    assert!(claims(s, on(A, "z", 0, 13), ALIVE).await);
    assert!(!claims(s, on(B, "z", 0, 23), ALIVE).await);
    // Other ids are unaffected.
    assert!(claims(s, on(B, "y", 5, 24), ALIVE).await);
}

/// A coordinator's own registry decides among its own streams: the
/// database does not second-guess it.
async fn a_coordinator_decides_among_its_own_streams(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    assert!(claims(s, on(A, "w", 1, 1), ALIVE).await);
    assert!(claims(s, on(A, "w", 2, 2), ALIVE).await);
    assert!(
        !claims(s, on(B, "w", 1, 3), ALIVE).await,
        "process 2 holds it"
    );
    assert!(claims(s, on(B, "w", 2, 4), ALIVE).await);
}

/// Once the holding coordinator's claims expired (it was killed), any
/// process may take its worker ids; a renewal keeps them, and one after a
/// lapse says which streams the coordinator still holds.
async fn an_expired_coordinator_frees_its_ids(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    assert!(claims(s, on(A, "w", 1, 1), EXPIRED).await);
    assert!(claims(s, on(A, "v", 1, 2), EXPIRED).await);
    assert!(claims(s, on(B, "w", 2, 3), ALIVE).await, "A expired");

    // A lived on after all: its renewal finds the lapse and what it holds.
    let held = s.worker_streams().renew(A, ALIVE).await.unwrap();
    assert_eq!(
        held,
        Some(vec![HeldStream {
            worker_id: "v".into(),
            stream: 2
        }]),
        "w went to B while A's claims lapsed"
    );
    assert_eq!(
        s.worker_streams().renew(A, ALIVE).await.unwrap(),
        None,
        "no lapse"
    );
    assert!(
        !claims(s, on(B, "v", 2, 4), ALIVE).await,
        "A is alive again"
    );
}

/// The claims run out in real time unless renewed.
async fn claims_run_out_unless_renewed(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    let ttl = 300;
    assert!(claims(s, on(A, "w", 1, 1), ttl).await);
    assert!(!claims(s, on(B, "w", 2, 2), ALIVE).await);
    tokio::time::sleep(std::time::Duration::from_millis(ttl as u64 + 100)).await;
    assert!(claims(s, on(B, "w", 2, 2), ALIVE).await, "A did not renew");

    // A coordinator that never claimed has nothing: a lapse with no streams.
    assert_eq!(
        s.worker_streams().renew("fresh", ALIVE).await.unwrap(),
        Some(vec![])
    );
}

/// A stream's end frees its id — but only its own row: the end of an older
/// stream of the same process leaves the newer one's claim. A shutdown
/// frees every id of the coordinator at once.
async fn an_ended_stream_releases_only_its_own_claim(b: Backend) {
    let db = store(b).await;
    let s = &*db.store;
    assert!(claims(s, on(A, "w", 1, 1), ALIVE).await);
    assert!(claims(s, on(A, "w", 1, 2), ALIVE).await, "reconnected");
    s.worker_streams().release(&on(A, "w", 1, 1)).await.unwrap();
    s.worker_streams().release(&on(B, "w", 1, 2)).await.unwrap();
    assert!(
        !claims(s, on(B, "w", 2, 3), ALIVE).await,
        "stream 2 holds it"
    );
    s.worker_streams().release(&on(A, "w", 1, 2)).await.unwrap();
    assert!(claims(s, on(B, "w", 2, 3), ALIVE).await, "released");

    assert!(claims(s, on(A, "x", 1, 4), ALIVE).await);
    assert!(claims(s, on(A, "y", 1, 5), ALIVE).await);
    s.worker_streams().retire(A).await.unwrap();
    assert!(claims(s, on(B, "x", 2, 6), ALIVE).await);
    assert!(claims(s, on(B, "y", 2, 7), ALIVE).await);
    assert_eq!(
        s.worker_streams().renew(A, ALIVE).await.unwrap(),
        Some(vec![]),
        "A is forgotten with its streams"
    );
    assert!(
        !claims(s, on(A, "w", 1, 8), ALIVE).await,
        "B's are untouched"
    );
}

on_both_backends!(
    another_process_is_refused_the_same_process_moves,
    a_coordinator_decides_among_its_own_streams,
    an_expired_coordinator_frees_its_ids,
    claims_run_out_unless_renewed,
    an_ended_stream_releases_only_its_own_claim,
);
