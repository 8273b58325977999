//! Group commit of worker reports.
//!
//! Every report joins a queue; whoever holds the commit lock drains the queue
//! into one `Store::report_many` call — one transaction and one fsync for all
//! the outcomes that arrived while the previous batch was committing — and
//! hands each caller its own result. No background task is involved: a
//! caller waits for the lock, finds its result already delivered by an
//! earlier leader, or commits the next batch itself. Replies still leave only
//! after the commit (I11).
//!
//! What a commit is, is the caller's: the core's also runs a dispatch pass
//! in the same transaction (see `Coordinator::record`).

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot::{self, error::TryRecvError};

use crate::domain::ReportAck;
use crate::error::{Error, Result};
use crate::store::Report;

/// Most reports committed in one transaction.
const MAX_BATCH: usize = 2048;

type Reply = oneshot::Sender<Result<ReportAck>>;

/// The report queue and the lock that makes one caller at a time its leader.
#[derive(Default)]
pub(crate) struct GroupCommit {
    queue: Mutex<Vec<(String, Report, Reply)>>,
    leader: tokio::sync::Mutex<()>,
}

impl GroupCommit {
    /// Records `reports`, possibly together with other callers' reports, and
    /// returns each one's result in order. The leader of a batch runs
    /// `commit` on it: one call for the whole batch, which records every
    /// report and acts on their effects itself, so they are acted on even
    /// when the caller that sent a report has gone away.
    pub(crate) async fn record<F, Fut>(
        &self,
        reports: Vec<(String, Report)>,
        commit: F,
    ) -> Vec<Result<ReportAck>>
    where
        F: Fn(Vec<(String, Report)>) -> Fut,
        Fut: Future<Output = Result<Vec<Result<ReportAck>>>>,
    {
        let mut waiting = Vec::with_capacity(reports.len());
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            for (worker_id, report) in reports {
                let (tx, rx) = oneshot::channel();
                queue.push((worker_id, report, tx));
                waiting.push(rx);
            }
        }
        let mut results = Vec::with_capacity(waiting.len());
        for mut rx in waiting {
            // Our reports are in the queue in order: lead batches until each
            // has its result. A leader whose call is canceled mid-commit
            // drops the batch's replies with it.
            let result = loop {
                match rx.try_recv() {
                    Ok(r) => break r,
                    Err(TryRecvError::Closed) => break Err(abandoned()),
                    Err(TryRecvError::Empty) => {}
                }
                let _leader = self.leader.lock().await;
                if let Ok(r) = rx.try_recv() {
                    break r;
                }
                self.commit_batch(&commit).await;
            };
            results.push(result);
        }
        results
    }

    async fn commit_batch<F, Fut>(&self, commit: &F)
    where
        F: Fn(Vec<(String, Report)>) -> Fut,
        Fut: Future<Output = Result<Vec<Result<ReportAck>>>>,
    {
        let batch: Vec<_> = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let n = queue.len().min(MAX_BATCH);
            queue.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        let (items, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|(w, r, tx)| ((w, r), tx)).unzip();
        let n = items.len();
        match commit(items).await {
            Ok(results) => {
                for (tx, r) in replies.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, reports = n, "recording a batch of reports failed");
                for tx in replies {
                    let _ = tx.send(Err(Error::NotRecorded(format!(
                        "the database failed ({e})"
                    ))));
                }
            }
        }
    }
}

/// The answer to a report whose batch's leader went away before answering
/// (its call was canceled): the transaction rolled back, or committed just
/// before, and either way the worker sends the report again — a repeat of
/// a recorded outcome is acknowledged like the first.
fn abandoned() -> Error {
    Error::NotRecorded("the call leading its batch was canceled before it answered".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::domain::{Completion, LeaseToken};

    fn report(task_id: i64) -> Vec<(String, Report)> {
        let lease = LeaseToken {
            task_id,
            attempt: 1,
        };
        vec![(
            "w".to_string(),
            Report::Complete(Completion {
                lease,
                secret: Default::default(),
                output: serde_json::Value::Null,
                add_tasks: Vec::new(),
            }),
        )]
    }

    /// A leader canceled mid-commit takes its batch's replies with it: the
    /// other callers in that batch are told to send again, not left waiting.
    #[tokio::test]
    async fn a_canceled_leader_fails_its_batch_instead_of_hanging_it() {
        let group = Arc::new(GroupCommit::default());
        // Hold the lead so that both reports queue up for one batch.
        let held = group.leader.lock().await;
        let (g, committing) = (group.clone(), Arc::new(tokio::sync::Notify::new()));
        let c = committing.clone();
        let leader = tokio::spawn(async move {
            g.record(report(1), |_| {
                c.notify_one();
                std::future::pending::<Result<Vec<Result<ReportAck>>>>()
            })
            .await
        });
        let g = group.clone();
        let other = tokio::spawn(async move {
            g.record(report(2), |_| async {
                Err::<Vec<Result<ReportAck>>, _>(Error::Corrupt(
                    "its report was in the first batch".into(),
                ))
            })
            .await
        });
        while group.queue.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
        drop(held);
        committing.notified().await;
        leader.abort();
        let answers = tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .expect("the other caller must not wait for ever")
            .unwrap();
        assert!(
            matches!(&answers[..], [Err(Error::NotRecorded(m))] if m.contains("canceled")),
            "{answers:?}"
        );
    }
}
