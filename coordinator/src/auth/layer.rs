//! [`Authorize`]: the tower service that checks a call's bearer token
//! against the RPC's roles before the handler sees it, and hands the
//! handler who called ([`Caller`], in the request's extensions).
//!
//! No token, a malformed header or an unknown token: `UNAUTHENTICATED`. A
//! known token whose role may not call the RPC: `PERMISSION_DENIED` naming
//! the roles that may. A refused call never reaches the handler, so it
//! changes nothing.

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

use super::{Auth, Role, WorkerIds, allowed_roles};

/// Who made a call: the NAME and ROLE of its token, and the worker ids a
/// worker token is bound to. Absent when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    pub worker_ids: Option<WorkerIds>,
}

impl Caller {
    /// Refuses a request naming a worker id this caller's token is not
    /// bound to. The check needs the request's body, so the worker
    /// handlers make it, right after decoding.
    pub fn may_act_as(&self, worker_id: &str) -> Result<(), Status> {
        match &self.worker_ids {
            Some(ids) if !ids.allows(worker_id) => Err(Status::permission_denied(format!(
                "token {:?} may act only as worker ids {ids}; this request names worker {}",
                self.name,
                crate::domain::shown(worker_id)
            ))),
            _ => Ok(()),
        }
    }
}

/// A Stagecoach service behind the token check.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    auth: Auth,
}

impl<S> Authorize<S> {
    pub fn new(inner: S, auth: Auth) -> Self {
        Self { inner, auth }
    }
}

impl<S: NamedService> NamedService for Authorize<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        match self.auth.check(path, allowed_roles(path), req.headers()) {
            Ok(Some(caller)) => {
                req.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(status) => {
                tracing::debug!(path, code = ?status.code(), "call refused: {}", status.message());
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// The caller of `path`, which `allowed` roles may use, or the status that
/// refuses the call.
pub(super) fn check(
    table: &super::TokenTable,
    path: &str,
    allowed: &[Role],
    headers: &http::HeaderMap,
) -> Result<Caller, Status> {
    const HOW: &str = "send the header `authorization: Bearer TOKEN` (an operator makes tokens with `coordinator token create`)";
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(Status::unauthenticated(format!(
            "this coordinator requires a bearer token: {HOW}"
        )));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "the authorization header is not a bearer token: {HOW}"
            ))
        })?;
    let Some(entry) = table.find(token) else {
        return Err(Status::unauthenticated(
            "unknown or revoked token: it is not in this coordinator's tokens file",
        ));
    };
    if !allowed.contains(&entry.role) {
        let needed: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        return Err(Status::permission_denied(format!(
            "token {:?} has role {}; {path} needs role {}",
            entry.name,
            entry.role,
            needed.join(" or ")
        )));
    }
    Ok(Caller {
        name: entry.name.clone(),
        role: entry.role,
        worker_ids: entry.worker_ids.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{TokenTable, new_token};
    use tonic::Code;

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = value {
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn each_refusal_says_what_is_missing() {
        let (token, line) = new_token(Role::Worker, "fleet", None).unwrap();
        let table = TokenTable::parse(&line).unwrap();
        let cancel = "/stagecoach.v1.MigrationService/CancelMigration";
        let code = |h: Option<&str>, path: &str| {
            check(&table, path, allowed_roles(path), &headers(h)).map_err(|s| s.code())
        };

        assert_eq!(code(None, cancel), Err(Code::Unauthenticated));
        assert_eq!(code(Some("Basic abc"), cancel), Err(Code::Unauthenticated));
        assert_eq!(code(Some("Bearer "), cancel), Err(Code::Unauthenticated));
        assert_eq!(
            code(Some("Bearer sct_other"), cancel),
            Err(Code::Unauthenticated)
        );
        let bearer = headers(Some(&format!("Bearer {token}")));
        let denied = check(&table, cancel, allowed_roles(cancel), &bearer).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            format!("token \"fleet\" has role worker; {cancel} needs role admin or client")
        );
        let heartbeat = "/stagecoach.v1.WorkerService/Heartbeat";
        let caller = check(&table, heartbeat, allowed_roles(heartbeat), &bearer).unwrap();
        assert_eq!(
            caller,
            Caller {
                name: "fleet".into(),
                role: Role::Worker,
                worker_ids: None,
            }
        );
    }
}
