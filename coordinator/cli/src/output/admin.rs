//! Views of pools and workers.

use serde_json::Value as Json;
use stagecoach_proto::v1::{Pool, WorkerInfo};

use super::Render;
use super::json;
use super::table::Table;

fn pool_row(p: &Pool) -> Vec<String> {
    vec![
        p.name.clone(),
        p.slots.to_string(),
        p.running.to_string(),
        p.queued.to_string(),
        if p.paused { "paused" } else { "admitting" }.to_string(),
    ]
}

const POOL_HEADER: [&str; 5] = ["POOL", "SLOTS", "RUNNING", "QUEUED", "ADMISSION"];

/// `stagecoach pools`.
pub struct PoolList<'a>(pub &'a [Pool]);

impl Render for PoolList<'_> {
    fn to_json(&self) -> Json {
        Json::Array(self.0.iter().map(json::pool).collect())
    }

    fn to_text(&self) -> String {
        let mut t = Table::new(&POOL_HEADER);
        for p in self.0 {
            t.row(pool_row(p));
        }
        t.render_or("no pools")
    }
}

/// One pool, after `pool create|set-slots|pause|resume`.
pub struct PoolView<'a>(pub &'a Pool);

impl Render for PoolView<'_> {
    fn to_json(&self) -> Json {
        json::pool(self.0)
    }

    fn to_text(&self) -> String {
        PoolList(std::slice::from_ref(self.0)).to_text()
    }
}

fn worker_row(w: &WorkerInfo) -> Vec<String> {
    let status = if w.eligible {
        "eligible".to_string()
    } else if w.ineligible_reason.is_empty() {
        "ineligible".to_string()
    } else {
        w.ineligible_reason.clone()
    };
    vec![
        w.worker_id.clone(),
        w.name.clone(),
        format!("{}/{}", w.leases.len(), w.slots),
        status,
        w.last_heartbeat
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string),
        w.kinds.join(","),
    ]
}

const WORKER_HEADER: [&str; 6] = ["WORKER", "NAME", "LEASES", "STATUS", "HEARTBEAT", "KINDS"];

/// `stagecoach workers`.
pub struct WorkerList<'a>(pub &'a [WorkerInfo]);

impl Render for WorkerList<'_> {
    fn to_json(&self) -> Json {
        Json::Array(self.0.iter().map(json::worker).collect())
    }

    fn to_text(&self) -> String {
        let mut t = Table::new(&WORKER_HEADER);
        for w in self.0 {
            t.row(worker_row(w));
        }
        t.render_or("no workers connected")
    }
}

/// One worker, after `drain` or `undrain`.
pub struct WorkerView<'a>(pub &'a WorkerInfo);

impl Render for WorkerView<'_> {
    fn to_json(&self) -> Json {
        json::worker(self.0)
    }

    fn to_text(&self) -> String {
        WorkerList(std::slice::from_ref(self.0)).to_text()
    }
}
