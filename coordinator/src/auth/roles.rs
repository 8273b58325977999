//! Which role may call which RPC. Paths not listed (a method added later,
//! a service this table does not know) are admin only: deny by default.

use std::fmt;
use std::str::FromStr;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// All of `MigrationService`: plans, create, cancel, retry, reads.
    Client,
    /// `WorkerService` only: subscribe, heartbeat, report outcomes.
    Worker,
    /// The read-only RPCs: plans, migrations, events, subject status,
    /// `ListPools`, `ListWorkers`.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Client, Role::Worker, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}; use admin, client, worker or viewer"))
    }
}

use Role::{Admin, Client, Viewer, Worker};

const MIGRATION_READ: &[Role] = &[Admin, Client, Viewer];
const MIGRATION_WRITE: &[Role] = &[Admin, Client];
const WORKER: &[Role] = &[Admin, Worker];
const FLEET_READ: &[Role] = &[Admin, Viewer];
const ADMIN: &[Role] = &[Admin];

/// Who may read the HTTP port (`--http-listen`: metrics and the
/// dashboard): it shows migrations, pools and workers, what a viewer sees.
pub const HTTP_READ: &[Role] = FLEET_READ;

/// The roles that may call `path` (`/package.Service/Method`).
pub fn allowed_roles(path: &str) -> &'static [Role] {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return ADMIN;
    };
    match (service, method) {
        (
            "stagecoach.v1.MigrationService",
            "GetPlan" | "ListPlans" | "GetMigration" | "ListMigrations" | "WatchMigration"
            | "GetSubjectStatus" | "ListEvents",
        ) => MIGRATION_READ,
        (
            "stagecoach.v1.MigrationService",
            "PutPlan" | "CreateMigration" | "CancelMigration" | "RetryMigration",
        ) => MIGRATION_WRITE,
        ("stagecoach.v1.WorkerService", "Subscribe" | "Heartbeat" | "Complete" | "Fail") => WORKER,
        ("stagecoach.v1.AdminService", "ListPools" | "ListWorkers") => FLEET_READ,
        // CreatePool, SetPoolSlots, PausePool, ResumePool, DrainWorker,
        // UndrainWorker, and anything unknown.
        _ => ADMIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_are_admin_only() {
        assert_eq!(
            allowed_roles("/stagecoach.v1.AdminService/UndrainWorker"),
            ADMIN
        );
        assert_eq!(allowed_roles("/stagecoach.v1.MigrationService/Nuke"), ADMIN);
        assert_eq!(allowed_roles("/other.Service/ListPools"), ADMIN);
        assert_eq!(allowed_roles("garbage"), ADMIN);
        assert_eq!(allowed_roles("/stagecoach.v1.WorkerService/Fail"), WORKER);
        assert_eq!(
            allowed_roles("/stagecoach.v1.AdminService/ListWorkers"),
            FLEET_READ
        );
    }

    #[test]
    fn roles_parse_by_name_only() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("Admin".parse::<Role>().is_err());
    }
}
