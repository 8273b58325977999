//! [`Worker::builder`]: every setting of a worker, validated once in
//! [`WorkerBuilder::build`] so a misconfigured worker fails at start with the
//! setting it got wrong, not minutes later on its first task.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

use crate::handler::{Handler, TaskContext, TaskError, TaskOutput};
use crate::tls::ClientTls;

/// Default number of tasks a worker runs at once.
pub const DEFAULT_SLOTS: u32 = 4;
/// Default bound on how long shutdown waits for in-flight tasks.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The most slots the coordinator accepts.
pub const MAX_SLOTS: u32 = 10_000;

/// A configured worker; run it with [`Worker::run`](crate::Worker::run).
pub struct Worker {
    pub(crate) config: Config,
    pub(crate) handlers: HashMap<String, Arc<dyn Handler>>,
}

/// The validated settings of a [`Worker`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Every coordinator address, as given, without repeats; never empty.
    pub(crate) coordinators: Vec<Address>,
    pub(crate) worker_id: String,
    pub(crate) name: String,
    pub(crate) slots: u32,
    pub(crate) drain_timeout: Duration,
    pub(crate) authorization: Option<MetadataValue<Ascii>>,
}

/// One coordinator address and its channel settings.
#[derive(Debug, Clone)]
pub(crate) struct Address {
    pub(crate) url: String,
    pub(crate) endpoint: Endpoint,
}

impl Worker {
    /// Starts configuring a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// The coordinator addresses it may connect to, in the order given.
    pub fn coordinators(&self) -> Vec<&str> {
        self.config
            .coordinators
            .iter()
            .map(|a| a.url.as_str())
            .collect()
    }

    /// The id the worker subscribes with.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// The task kinds it has handlers for, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    /// How many tasks it runs at once.
    pub fn slots(&self) -> u32 {
        self.config.slots
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("coordinators", &self.coordinators())
            .field("worker_id", &self.config.worker_id)
            .field("slots", &self.config.slots)
            .field("kinds", &self.kinds())
            .finish_non_exhaustive()
    }
}

/// A setting [`WorkerBuilder::build`] rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    /// Neither `.coordinator(url)` nor `.coordinators(urls)` gave an address.
    #[error(
        "no coordinator address: call .coordinator(\"http://host:port\") or .coordinators([...])"
    )]
    MissingCoordinator,
    /// The coordinator address is not a usable URL.
    #[error("coordinator address {url:?} is invalid: {reason}")]
    InvalidCoordinator { url: String, reason: String },
    /// The worker id is empty or too long.
    #[error("worker id {0:?} is invalid: it must be 1-200 characters")]
    InvalidWorkerId(String),
    /// Slots outside 1..=10000.
    #[error("slots must be between 1 and {MAX_SLOTS}, got {0}")]
    InvalidSlots(u32),
    /// No handler was registered.
    #[error("no handlers: register at least one with .handler(kind, f)")]
    NoHandlers,
    /// A kind name the coordinator would reject.
    #[error("task kind {0:?} is invalid: use 1-100 characters of [A-Za-z0-9._-]")]
    InvalidKind(String),
    /// Two handlers for one kind.
    #[error("task kind {0:?} has more than one handler")]
    DuplicateKind(String),
    /// A bearer token that cannot be sent as a header.
    #[error("the auth token contains characters not allowed in an HTTP header")]
    InvalidToken,
}

/// Configures a [`Worker`]; see the crate docs for an example.
#[derive(Default)]
#[must_use]
pub struct WorkerBuilder {
    coordinators: Vec<String>,
    worker_id: Option<String>,
    name: Option<String>,
    slots: Option<u32>,
    drain_timeout: Option<Duration>,
    token: Option<String>,
    tls: Option<ClientTls>,
    handlers: Vec<(String, Arc<dyn Handler>)>,
}

impl WorkerBuilder {
    /// A coordinator's gRPC address, e.g. `http://127.0.0.1:50051`. At least
    /// one address is required, from this or [`coordinators`](Self::coordinators);
    /// each call adds one.
    ///
    /// One address behind a load balancer works as well as a list: the
    /// worker reconnects to whatever answers there.
    pub fn coordinator(mut self, url: impl Into<String>) -> Self {
        self.coordinators.push(url.into());
        self
    }

    /// Several coordinators sharing one database. The worker streams from
    /// one of them at a time, starting with a random one so a fleet spreads
    /// out, and moves to the next when its stream drops or a connect fails;
    /// heartbeats and reports that find their coordinator unavailable are
    /// tried on the others. Leases survive the move, since every coordinator
    /// of the database knows them. Adds to the addresses of
    /// [`coordinator`](Self::coordinator); a repeated address counts once.
    pub fn coordinators(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.coordinators.extend(urls.into_iter().map(Into::into));
        self
    }

    /// A stable id, unique in the fleet (default `<hostname>-<pid>-<random>`).
    /// Reconnects reuse it so leases still held stay valid.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Free text shown to operators (default: the host name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How many tasks run at once (default 4, at least 1).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = Some(slots);
        self
    }

    /// How long shutdown waits for in-flight tasks before canceling them
    /// (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// A bearer token sent with every call, for a coordinator with auth on.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// TLS settings for `https://` addresses: the CA to trust (default: the
    /// system's roots) and a client certificate for a coordinator that
    /// requires one. An `https://` address uses TLS without this too; an
    /// `http://` address with it is refused.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Registers an `async fn` or closure as the handler of `kind`.
    pub fn handler<F, Fut>(self, kind: impl Into<String>, f: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<TaskOutput, TaskError>> + Send + 'static,
    {
        self.handler_impl(kind, f)
    }

    /// Registers any [`Handler`] (e.g. a struct holding its configuration)
    /// as the handler of `kind`.
    pub fn handler_impl(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.push((kind.into(), Arc::new(handler)));
        self
    }

    /// Checks every setting and fills in the defaults.
    pub fn build(self) -> Result<Worker, BuildError> {
        let mut coordinators: Vec<Address> = Vec::with_capacity(self.coordinators.len());
        for url in self.coordinators {
            if coordinators.iter().all(|a| a.url != url) {
                let endpoint = endpoint(&url, self.tls.as_ref())?;
                coordinators.push(Address { url, endpoint });
            }
        }
        if coordinators.is_empty() {
            return Err(BuildError::MissingCoordinator);
        }

        let worker_id = self.worker_id.unwrap_or_else(default_worker_id);
        if worker_id.is_empty() || worker_id.chars().count() > 200 {
            return Err(BuildError::InvalidWorkerId(worker_id));
        }

        let slots = self.slots.unwrap_or(DEFAULT_SLOTS);
        if !(1..=MAX_SLOTS).contains(&slots) {
            return Err(BuildError::InvalidSlots(slots));
        }

        if self.handlers.is_empty() {
            return Err(BuildError::NoHandlers);
        }
        let mut handlers = HashMap::new();
        for (kind, handler) in self.handlers {
            if !valid_kind(&kind) {
                return Err(BuildError::InvalidKind(kind));
            }
            if handlers.contains_key(&kind) {
                return Err(BuildError::DuplicateKind(kind));
            }
            handlers.insert(kind, handler);
        }

        let authorization = self
            .token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| BuildError::InvalidToken)
            })
            .transpose()?;

        Ok(Worker {
            config: Config {
                coordinators,
                worker_id,
                name: self.name.unwrap_or_else(hostname),
                slots,
                drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
                authorization,
            },
            handlers,
        })
    }
}

fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, BuildError> {
    let endpoint = crate::tls::coordinator_endpoint(url, tls).map_err(|reason| {
        BuildError::InvalidCoordinator {
            url: url.to_string(),
            reason,
        }
    })?;
    Ok(endpoint
        // Fail a connect attempt fast so the reconnect loop, not a hung
        // socket, decides when to try again.
        .connect_timeout(Duration::from_secs(5))
        // HTTP/2 pings notice a coordinator that vanished without closing
        // the connection, so the Subscribe stream cannot go silently deaf.
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// The coordinator's rule for kind names.
fn valid_kind(kind: &str) -> bool {
    (1..=100).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn default_worker_id() -> String {
    format!(
        "{}-{}-{:08x}",
        hostname(),
        std::process::id(),
        rand::random::<u32>()
    )
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> WorkerBuilder {
        Worker::builder()
            .coordinator("http://127.0.0.1:50051")
            .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
    }

    #[test]
    fn defaults_are_filled_in() {
        let worker = noop().build().unwrap();
        assert_eq!(worker.slots(), DEFAULT_SLOTS);
        assert_eq!(worker.kinds(), vec!["noop".to_string()]);
        assert!(worker.worker_id().contains(&std::process::id().to_string()));
        assert_eq!(worker.config.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    }

    #[test]
    fn each_bad_setting_is_named() {
        let err = |b: WorkerBuilder| b.build().unwrap_err();
        assert_eq!(
            err(Worker::builder().handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })),
            BuildError::MissingCoordinator
        );
        assert!(matches!(
            err(noop().coordinator("ftp://x")),
            BuildError::InvalidCoordinator { .. }
        ));
        assert!(matches!(
            err(noop().coordinator("not a url")),
            BuildError::InvalidCoordinator { .. }
        ));
        assert_eq!(err(noop().slots(0)), BuildError::InvalidSlots(0));
        assert_eq!(
            err(noop().worker_id("")),
            BuildError::InvalidWorkerId(String::new())
        );
        assert_eq!(
            err(Worker::builder().coordinator("http://h:1")),
            BuildError::NoHandlers
        );
        assert_eq!(
            err(noop().handler("bad kind", |_ctx| async { Ok(TaskOutput::empty()) })),
            BuildError::InvalidKind("bad kind".into())
        );
        assert_eq!(
            err(noop().handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })),
            BuildError::DuplicateKind("noop".into())
        );
        assert_eq!(err(noop().token("a\nb")), BuildError::InvalidToken);
    }

    #[test]
    fn coordinator_addresses_add_up_and_are_each_checked() {
        let worker = noop()
            .coordinators(["http://c2:50051", "http://c3:50051"])
            .coordinator("http://c2:50051")
            .build()
            .unwrap();
        assert_eq!(
            worker.coordinators(),
            [
                "http://127.0.0.1:50051",
                "http://c2:50051",
                "http://c3:50051"
            ]
        );
        let only_list = Worker::builder()
            .coordinators(vec![String::from("http://c1:1")])
            .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
            .build()
            .unwrap();
        assert_eq!(only_list.coordinators(), ["http://c1:1"]);

        assert_eq!(
            Worker::builder()
                .coordinators(Vec::<String>::new())
                .handler("noop", |_ctx| async { Ok(TaskOutput::empty()) })
                .build()
                .unwrap_err(),
            BuildError::MissingCoordinator
        );
        match noop()
            .coordinators(["http://ok:1", "ftp://bad:2"])
            .build()
            .unwrap_err()
        {
            BuildError::InvalidCoordinator { url, .. } => assert_eq!(url, "ftp://bad:2"),
            other => panic!("expected the bad address to be named, got {other:?}"),
        }
    }

    #[test]
    fn async_fns_and_closures_register() {
        async fn echo(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
            Ok(TaskOutput::new(ctx.payload().clone()))
        }
        let worker = noop()
            .handler("echo", echo)
            .handler("kind", |ctx| async move {
                Ok(TaskOutput::new(ctx.kind().into()))
            })
            .build()
            .unwrap();
        assert_eq!(worker.kinds(), vec!["echo", "kind", "noop"]);
    }
}
