//! Bearer tokens with roles, checked at the edge before any handler runs.
//!
//! | file | what it holds |
//! |---|---|
//! | [`tokens`] | the tokens file (`ROLE NAME SHA256HEX [WORKER_IDS]` lines), its parser, lookups in constant time, and `coordinator token create` |
//! | [`roles`] | the roles and which of them may call each RPC path (unknown paths: admin only) |
//! | [`layer`] | [`Authorize`], the tower service wrapped around each of the three Stagecoach services |
//!
//! Health (`grpc.health.v1`) and server reflection are not wrapped: health
//! must answer load balancers and container checks that hold no token, and
//! reflection only describes the public schema (the `.proto` files). Every
//! call of `MigrationService`, `WorkerService` and `AdminService` needs a
//! token once a tokens file is given.
//!
//! The table lives behind an `RwLock` and is swapped whole on SIGHUP
//! ([`Auth::reload`]); a file that does not parse on reload is logged and the
//! old table kept, so a typo cannot lock every client out.

mod layer;
mod roles;
mod tokens;

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use tonic::codegen::http;

pub use layer::{Authorize, Caller};
pub use roles::{HTTP_READ, Role, allowed_roles};
pub use tokens::{TokenFileError, TokenTable, WorkerIds, new_token};

/// The tokens a coordinator accepts, or none (auth off).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    inner: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
}

impl Auth {
    /// No tokens: every call passes and names no caller.
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Reads the tokens file; a bad line is an error naming its number.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let table = TokenTable::read(path)?;
        Ok(Self {
            inner: Some(Arc::new(Shared {
                path: path.to_path_buf(),
                table: RwLock::new(Arc::new(table)),
            })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The current table, or `None` when auth is off.
    pub(crate) fn table(&self) -> Option<Arc<TokenTable>> {
        let shared = self.inner.as_ref()?;
        let table = shared.table.read().unwrap_or_else(PoisonError::into_inner);
        Some(table.clone())
    }

    /// Who calls `path`, which the `allowed` roles may use: `Ok(None)` when
    /// auth is off, the refusal (`UNAUTHENTICATED` or `PERMISSION_DENIED`,
    /// saying what is missing) when the headers carry no such token.
    pub fn check(
        &self,
        path: &str,
        allowed: &[Role],
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, tonic::Status> {
        match self.table() {
            None => Ok(None),
            Some(table) => layer::check(&table, path, allowed, headers).map(Some),
        }
    }

    /// Reads the file again and swaps the table in; on an error the old
    /// table stays. Returns how many tokens are now accepted.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let Some(shared) = &self.inner else {
            return Ok(0);
        };
        let table = TokenTable::read(&shared.path)?;
        let n = table.len();
        *shared.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        Ok(n)
    }

    /// Reloads the tokens file on every SIGHUP until `shutdown`.
    pub async fn reload_on_sighup(self, shutdown: tokio_util::sync::CancellationToken) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Some(shared) = self.inner.clone() else {
                return;
            };
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP: the tokens file will not be reloaded");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = hup.recv() => {}
                }
                let path = shared.path.display().to_string();
                match self.reload() {
                    Ok(n) => {
                        tracing::info!(tokens = n, file = %path, "SIGHUP: tokens file reloaded")
                    }
                    Err(e) => tracing::error!(
                        file = %path,
                        "SIGHUP: tokens file not reloaded, the previous tokens stay in force: {e}"
                    ),
                }
            }
        }
        #[cfg(not(unix))]
        let _ = (self, shutdown);
    }
}
