//! `pools`, `pool create|set-slots|pause|resume`, `workers`, `drain`,
//! `undrain`.

use stagecoach_proto::v1::{
    CreatePoolRequest, DrainWorkerRequest, ListPoolsRequest, ListWorkersRequest, PausePoolRequest,
    ResumePoolRequest, SetPoolSlotsRequest, UndrainWorkerRequest,
};

use super::{Outcome, need};
use crate::args::PoolCommand;
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::output::admin::{PoolList, PoolView, WorkerList, WorkerView};

pub async fn pools(s: &Session, out: Out) -> Result<Outcome, CliError> {
    let pools = s
        .admin
        .clone()
        .list_pools(ListPoolsRequest {})
        .await?
        .into_inner()
        .pools;
    out.print(&PoolList(&pools))?;
    Ok(Outcome::Success)
}

pub async fn pool(s: &Session, out: Out, cmd: PoolCommand) -> Result<Outcome, CliError> {
    let mut admin = s.admin.clone();
    let (pool, rpc) = match cmd {
        PoolCommand::Create { name, slots } => (
            admin
                .create_pool(CreatePoolRequest { name, slots })
                .await?
                .into_inner()
                .pool,
            "CreatePool",
        ),
        PoolCommand::SetSlots { name, slots } => (
            admin
                .set_pool_slots(SetPoolSlotsRequest { name, slots })
                .await?
                .into_inner()
                .pool,
            "SetPoolSlots",
        ),
        PoolCommand::Pause { name } => (
            admin
                .pause_pool(PausePoolRequest { name })
                .await?
                .into_inner()
                .pool,
            "PausePool",
        ),
        PoolCommand::Resume { name } => (
            admin
                .resume_pool(ResumePoolRequest { name })
                .await?
                .into_inner()
                .pool,
            "ResumePool",
        ),
    };
    out.print(&PoolView(&need(pool, rpc, "pool")?))?;
    Ok(Outcome::Success)
}

pub async fn workers(s: &Session, out: Out) -> Result<Outcome, CliError> {
    let workers = s
        .admin
        .clone()
        .list_workers(ListWorkersRequest {})
        .await?
        .into_inner()
        .workers;
    out.print(&WorkerList(&workers))?;
    Ok(Outcome::Success)
}

/// Drains the worker, or undrains it when `drain` is false.
pub async fn drain(
    s: &Session,
    out: Out,
    worker_id: String,
    drain: bool,
) -> Result<Outcome, CliError> {
    let mut admin = s.admin.clone();
    let (worker, rpc) = if drain {
        let w = admin.drain_worker(DrainWorkerRequest { worker_id }).await?;
        (w.into_inner().worker, "DrainWorker")
    } else {
        let w = admin
            .undrain_worker(UndrainWorkerRequest { worker_id })
            .await?;
        (w.into_inner().worker, "UndrainWorker")
    };
    out.print(&WorkerView(&need(worker, rpc, "worker")?))?;
    Ok(Outcome::Success)
}
