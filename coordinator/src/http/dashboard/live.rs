//! `GET /api/live`: server-sent events saying which migrations changed, so
//! an open page refreshes what it shows without reloading.
//!
//! Driven by [`Coordinator::changes`], the notifications WatchMigration
//! uses. Each connection is bounded: changes are gathered for
//! [`GATHER`] and sent as one `changes` event of at most [`MAX_IDS`]
//! ids; more than that, or a connection that fell behind the broadcast
//! channel, gets one `resync` event instead (reread everything). Open
//! streams are limited ([`super::MAX_LIVE_STREAMS`]), and every stream ends
//! when the coordinator shuts down, so a graceful stop never waits on a
//! browser.
//!
//! The page reads this with `fetch()`, not `EventSource`, so it can send
//! its token in the `Authorization` header.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::{self, error::RecvError};

use super::api::ApiError;
use super::{Dashboard, MAX_LIVE_STREAMS};
use crate::engine::Coordinator;

/// How long changes are gathered into one event: a busy migration changes
/// hundreds of times a second, a page need not redraw as often.
const GATHER: Duration = Duration::from_millis(300);
/// Ids in one `changes` event; more become a `resync`.
const MAX_IDS: usize = 500;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Serialize)]
struct Changes<'a> {
    migration_ids: &'a BTreeSet<i64>,
}

pub async fn live(State(d): State<Dashboard>) -> Response {
    let Ok(permit) = d.live_streams.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            format!(
                "{MAX_LIVE_STREAMS} live dashboard streams are open, the limit; close a dashboard tab or retry later"
            ),
        )
        .into_response();
    };
    let feed = Feed {
        core: d.core.clone(),
        changes: d.core.changes(),
        _permit: permit,
        greeted: false,
    };
    Sse::new(futures::stream::unfold(feed, Feed::next))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// One connection's state.
struct Feed {
    core: Arc<Coordinator>,
    changes: broadcast::Receiver<i64>,
    /// Held as long as the stream is open.
    _permit: OwnedSemaphorePermit,
    greeted: bool,
}

/// What one wait on the channel gave.
enum Gathered {
    Ids(BTreeSet<i64>),
    Resync,
    Closed,
}

impl Feed {
    /// The next event, `None` to end the stream.
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        if !self.greeted {
            // Tells the page the feed is up: it rereads what it shows,
            // since changes before this moment were not sent.
            self.greeted = true;
            return Some((Ok(Event::default().event("ready").data("{}")), self));
        }
        let core = self.core.clone();
        let gathered = tokio::select! {
            g = self.gather() => g,
            _ = core.shutting_down() => Gathered::Closed,
        };
        let event = match gathered {
            Gathered::Closed => return None,
            Gathered::Resync => Event::default().event("resync").data("{}"),
            Gathered::Ids(ids) => {
                let data = serde_json::to_string(&Changes {
                    migration_ids: &ids,
                })
                .unwrap_or_else(|_| "{}".into());
                Event::default().event("changes").data(data)
            }
        };
        Some((Ok(event), self))
    }

    /// Waits for a change, then gathers more for [`GATHER`].
    async fn gather(&mut self) -> Gathered {
        let mut ids = BTreeSet::new();
        match self.changes.recv().await {
            Ok(id) => ids.insert(id),
            Err(RecvError::Lagged(_)) => return Gathered::Resync,
            Err(RecvError::Closed) => return Gathered::Closed,
        };
        let until = tokio::time::Instant::now() + GATHER;
        loop {
            match tokio::time::timeout_at(until, self.changes.recv()).await {
                Err(_) => return Gathered::Ids(ids),
                Ok(Ok(id)) => {
                    ids.insert(id);
                    if ids.len() > MAX_IDS {
                        return Gathered::Resync;
                    }
                }
                Ok(Err(RecvError::Lagged(_))) => return Gathered::Resync,
                Ok(Err(RecvError::Closed)) => return Gathered::Closed,
            }
        }
    }
}
