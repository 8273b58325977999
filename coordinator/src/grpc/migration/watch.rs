//! `WatchMigration`: the event log as a live stream.
//!
//! The stream replays the log after the client's cursor, then waits for the
//! core's change notifications for this migration and sends what is new —
//! no polling. It ends once the migration is terminal and every event was
//! sent, or when the coordinator shuts down.

use std::sync::Arc;

use stagecoach_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::WatchStream;
use crate::engine::Coordinator;
use crate::grpc::convert::{event_to_pb, migration_to_pb};

const PAGE: u32 = 1000;

pub(super) async fn stream(
    core: Arc<Coordinator>,
    id: i64,
    after: i64,
) -> Result<WatchStream, Status> {
    // Subscribe before the first read so no change between the two is missed.
    let mut changes = core.changes();
    core.get_migration(id).await?;
    let s = async_stream(move |tx| async move {
        let mut cursor = after;
        loop {
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
        }
    });
    Ok(s)
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
