//! A group commit on PostgreSQL: a batch's plain completions and a dispatch
//! pass for every eligible worker, in one transaction. One commit (one
//! fsync) and one hold of each migration's lock records the batch and
//! refills the slots it freed; separately, the reports and each claim of a
//! busy migration queued behind one another's commits on its row lock.
//!
//! The locks come in the store's one order: the workers' advisory locks,
//! the reported tasks' migrations by id (waiting), pools (admission), then
//! the pass's other migrations, skipped while another transaction holds
//! them, and task rows last.

use std::collections::HashMap;

use sqlx::PgPool;

use super::{bulk, claim, merge, notify};
use crate::domain::ReportAck;
use crate::error::Result;
use crate::store::common::Plain;
use crate::store::{ClaimRequest, Effects, Limits, Pass};

/// Records the live ones of `plain` and claims for `requests`, in one
/// transaction. Returns the recorded completions by batch index (the rest
/// are the one-by-one path's) and the pass.
pub(super) async fn report_and_claim(
    db: &PgPool,
    origin: &str,
    plain: &[Plain<'_>],
    requests: &[ClaimRequest],
    limits: Limits,
) -> Result<(HashMap<usize, (ReportAck, Effects)>, Pass)> {
    let claiming = claim::wants_work(requests);
    if plain.is_empty() && !claiming {
        return Ok((HashMap::new(), claim::nothing(requests)));
    }
    let mut tx = db.begin().await?;
    // The workers' locks come first; a batch takes them in its first
    // statement.
    let completed = if plain.is_empty() {
        claim::lock_workers(&mut tx, requests).await?;
        bulk::Completed::default()
    } else {
        let lock_first = if claiming { requests } else { &[] };
        bulk::complete_live(&mut tx, origin, plain, lock_first).await?
    };
    let mut fx = Effects::default();
    for (_, effects) in completed.done.values() {
        merge(&mut fx, effects.clone());
    }
    let pass = if claiming {
        // Waiting for a migration lock is safe only while holding none.
        let wait = plain.is_empty();
        claim::claim_in(&mut tx, requests, limits, wait, &completed.known, &mut fx).await?
    } else {
        claim::nothing(requests)
    };
    fx.dispatch |= pass.partial;
    notify::commit_after(tx, origin, &fx, &completed.published).await?;
    Ok((completed.done, pass))
}
