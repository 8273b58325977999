//! The gRPC edge: three thin services over the core, the conversions between
//! protobuf and domain types, and the one error-to-status mapping. Nothing
//! below this module imports generated protobuf types.

mod admin;
pub mod convert;
mod limit;
mod migration;
mod status;
mod text;
mod worker;

pub use admin::AdminApi;
pub use limit::{DEFAULT_MAX_REQUEST_BYTES, RequestLimit};
pub use migration::MigrationApi;
pub use status::code_of;
pub use worker::WorkerApi;

/// The name of the token that made the call (put there by
/// `auth::Authorize`), or `None` when auth is off.
fn caller_name<T>(req: &tonic::Request<T>) -> Option<String> {
    req.extensions()
        .get::<crate::auth::Caller>()
        .map(|c| c.name.clone())
}
