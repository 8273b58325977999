//! `WatchMigration`: the event log as a live stream.
//!
//! The stream replays the log after the client's cursor, then waits for the
//! core's change notifications for this migration and sends what is new —
//! no polling. It ends once the migration is terminal and every event was
//! sent, or when the coordinator shuts down.
//!
//! A busy migration changes thousands of times a second; a watcher reads at
//! most once per [`MIN_GAP`] and each read serves every change before it, so
//! watching costs a few reads a second however fast tasks finish.

use std::sync::Arc;
use std::time::Duration;

use stagecoach_proto::v1 as pb;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Instant;
use tonic::Status;

use super::WatchStream;
use crate::engine::Coordinator;
use crate::grpc::convert::{event_to_pb, migration_to_pb};

const PAGE: u32 = 1000;

/// Shortest time between two reads of one watcher.
const MIN_GAP: Duration = Duration::from_millis(25);

pub(super) async fn stream(
    core: Arc<Coordinator>,
    id: i64,
    after: i64,
) -> Result<WatchStream, Status> {
    // Subscribe before the first read so no change between the two is missed.
    let mut changes = core.changes();
    core.get_migration(id).await?;
    // Held by the stream the client reads, not by the task feeding it: it
    // is freed when the client goes away, even while nothing changes.
    let permit = core.watch_permit()?;
    let s = async_stream(move |tx| async move {
        let mut cursor = after;
        loop {
            let read_at = Instant::now();
            // Drain everything new, page by page.
            loop {
                let events = match core.list_events(id, cursor, PAGE).await {
                    Ok(e) => e,
                    Err(e) => return tx.send(Err(e.into())).await.ok(),
                };
                let migration = match core.get_migration(id).await {
                    Ok(m) => m,
                    Err(e) => return tx.send(Err(e.into())).await.ok(),
                };
                let full = events.len() == PAGE as usize;
                if let Some(last) = events.last() {
                    cursor = last.id;
                }
                let done = migration.state.is_terminal() && !full;
                let msg = pb::WatchMigrationResponse {
                    events: events.iter().map(event_to_pb).collect(),
                    migration: Some(migration_to_pb(&migration)),
                };
                tx.send(Ok(msg)).await.ok()?;
                if done {
                    return Some(());
                }
                if !full {
                    break;
                }
            }
            // Wait for a change to this migration.
            loop {
                let changed = tokio::select! {
                    c = changes.recv() => c,
                    _ = core.shutting_down() => return Some(()),
                };
                match changed {
                    Ok(changed) if changed == id => break,
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return Some(()),
                }
            }
            // Let changes gather until MIN_GAP after the last read; the next
            // read covers every notice queued meanwhile.
            tokio::select! {
                () = tokio::time::sleep_until(read_at + MIN_GAP) => {}
                _ = core.shutting_down() => return Some(()),
            }
            loop {
                match changes.try_recv() {
                    Ok(_) | Err(TryRecvError::Lagged(_)) => continue,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return Some(()),
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::StreamExt::map(s, move |item| {
        let _held = &permit;
        item
    })))
}

/// Runs `body` as a task feeding a channel-backed stream; the task stops when
/// the client goes away (the send fails).
fn async_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchMigrationResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = Option<()>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
