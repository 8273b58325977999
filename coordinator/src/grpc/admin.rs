//! `AdminService`: pools and the connected worker fleet.

use std::sync::Arc;

use stagecoach_proto::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::caller_name;
use super::convert::{pool_to_pb, worker_to_pb};
use super::text::checked;
use crate::engine::Coordinator;

/// The operator API.
pub struct AdminApi {
    core: Arc<Coordinator>,
}

impl AdminApi {
    pub fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

/// Who to name in the log for a change: the token's name, or `anonymous`
/// when auth is off. (Pools and workers have no event log.)
fn actor<T>(req: &Request<T>) -> String {
    caller_name(req).unwrap_or_else(|| "anonymous".to_string())
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = self.core.list_pools().await?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.iter().map(pool_to_pb).collect(),
        }))
    }

    async fn create_pool(
        &self,
        req: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        let by = actor(&req);
        let r = checked(req)?;
        let pool = self.core.create_pool(&r.name, r.slots).await?;
        tracing::info!(actor = %by, pool = %pool.name, slots = r.slots, "pool created by {by}");
        Ok(Response::new(pb::CreatePoolResponse {
            pool: Some(pool_to_pb(&pool)),
        }))
    }

    async fn set_pool_slots(
        &self,
        req: Request<pb::SetPoolSlotsRequest>,
    ) -> Result<Response<pb::SetPoolSlotsResponse>, Status> {
        let by = actor(&req);
        let r = checked(req)?;
        let pool = self.core.set_pool_slots(&r.name, r.slots).await?;
        tracing::info!(actor = %by, pool = %pool.name, slots = r.slots, "pool slots set by {by}");
        Ok(Response::new(pb::SetPoolSlotsResponse {
            pool: Some(pool_to_pb(&pool)),
        }))
    }

    async fn pause_pool(
        &self,
        req: Request<pb::PausePoolRequest>,
    ) -> Result<Response<pb::PausePoolResponse>, Status> {
        let by = actor(&req);
        let pool = self.core.set_pool_paused(&checked(req)?.name, true).await?;
        tracing::info!(actor = %by, pool = %pool.name, "pool paused by {by}");
        Ok(Response::new(pb::PausePoolResponse {
            pool: Some(pool_to_pb(&pool)),
        }))
    }

    async fn resume_pool(
        &self,
        req: Request<pb::ResumePoolRequest>,
    ) -> Result<Response<pb::ResumePoolResponse>, Status> {
        let by = actor(&req);
        let pool = self
            .core
            .set_pool_paused(&checked(req)?.name, false)
            .await?;
        tracing::info!(actor = %by, pool = %pool.name, "pool resumed by {by}");
        Ok(Response::new(pb::ResumePoolResponse {
            pool: Some(pool_to_pb(&pool)),
        }))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let mut workers = Vec::new();
        for w in self.core.workers().list() {
            let leases = self.core.store().live_leases(&w.spec.worker_id).await?;
            workers.push(worker_to_pb(&w, leases));
        }
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn drain_worker(
        &self,
        req: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let by = actor(&req);
        let id = checked(req)?.worker_id;
        let w = self.core.drain_worker(&id)?;
        tracing::info!(actor = %by, worker_id = %id, "worker drained by {by}");
        let leases = self.core.store().live_leases(&id).await?;
        Ok(Response::new(pb::DrainWorkerResponse {
            worker: Some(worker_to_pb(&w, leases)),
        }))
    }

    async fn undrain_worker(
        &self,
        req: Request<pb::UndrainWorkerRequest>,
    ) -> Result<Response<pb::UndrainWorkerResponse>, Status> {
        let id = checked(req)?.worker_id;
        let w = self.core.undrain_worker(&id)?;
        let leases = self.core.store().live_leases(&id).await?;
        Ok(Response::new(pb::UndrainWorkerResponse {
            worker: Some(worker_to_pb(&w, leases)),
        }))
    }
}
