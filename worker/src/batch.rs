//! Coalescing reports into batch calls.
//!
//! A busy worker finishes many tasks at once; sending each outcome in its own
//! `Complete` call costs a round trip and a coordinator transaction apiece.
//! Reports wait in a queue while a call is in flight; whoever sends next
//! takes everything queued into one call (the protocol accepts a batch and
//! answers each report in `results`), then hands each caller its own answer.
//! An idle worker still reports at once: a lone report goes out immediately.

use std::future::Future;
use std::sync::Mutex;

use stagecoach_proto::v1::ReportResponse;
use tokio::sync::oneshot;
use tonic::Status;

/// Most reports in one call.
const MAX_BATCH: usize = 512;

/// Scheduler turns a sender gives other tasks before taking the queue.
const YIELDS: usize = 3;

type Answer = Result<ReportResponse, Status>;

/// A queue of reports of one kind (completions or failures) and the lock
/// that makes one caller at a time its sender.
pub(crate) struct Batcher<T> {
    queue: Mutex<Vec<(T, oneshot::Sender<Answer>)>>,
    sender: tokio::sync::Mutex<()>,
}

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            sender: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T> Batcher<T> {
    /// Sends `item`, possibly in one call with other queued items, and returns
    /// this item's answer as if it had been sent alone: a response with its
    /// one result, or the call's error.
    pub(crate) async fn send<F, Fut>(&self, item: T, call: F) -> Answer
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Answer>,
    {
        let (tx, mut rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((item, tx));
        loop {
            if let Ok(answer) = rx.try_recv() {
                return answer;
            }
            let _sender = self.sender.lock().await;
            if let Ok(answer) = rx.try_recv() {
                return answer;
            }
            // Let tasks that are about to report (their assignments arrived
            // with the answer to the previous call) join this call.
            for _ in 0..YIELDS {
                tokio::task::yield_now().await;
            }
            let batch: Vec<_> = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
            let n = items.len();
            match call(items).await {
                Ok(response) if response.results.len() == n => {
                    for (reply, result) in replies.into_iter().zip(response.results) {
                        let _ = reply.send(Ok(ReportResponse {
                            results: vec![result],
                        }));
                    }
                }
                // A lone report gets the call's own answer (a rejected lone
                // report fails the call); a failed batch call failed for all.
                answer => {
                    for reply in replies {
                        let _ = reply.send(answer.clone());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use stagecoach_proto::v1::ReportResult;

    use super::*;

    fn accept_all(items: Vec<u32>) -> Answer {
        let results = items
            .iter()
            .map(|i| ReportResult {
                accepted: true,
                code: *i as i32,
                ..Default::default()
            })
            .collect();
        Ok(ReportResponse { results })
    }

    #[tokio::test]
    async fn concurrent_reports_share_calls_and_each_gets_its_own_answer() {
        let batcher = Arc::new(Batcher::<u32>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut joins = Vec::new();
        for i in 0..200u32 {
            let (b, calls) = (batcher.clone(), calls.clone());
            joins.push(tokio::spawn(async move {
                b.send(i, |items| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        accept_all(items)
                    }
                })
                .await
            }));
        }
        for (i, j) in joins.into_iter().enumerate() {
            let answer = j.await.unwrap().unwrap();
            assert_eq!(answer.results.len(), 1);
            assert_eq!(
                answer.results[0].code, i as i32,
                "each caller gets its own result"
            );
        }
        assert!(calls.load(Ordering::SeqCst) < 200, "reports were batched");
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_report_in_it() {
        let batcher = Batcher::<u32>::default();
        let answer = batcher
            .send(1, |_| async { Err(Status::unavailable("down")) })
            .await;
        assert_eq!(answer.unwrap_err().code(), tonic::Code::Unavailable);
    }
}
