//! The Stagecoach wire protocol, package `stagecoach.v1`.
//!
//! The `.proto` files under `proto/stagecoach/v1/` are the reference for
//! grpcurl users and for clients generated in other languages; this crate only
//! compiles them (with `protox`, no system `protoc`) and exposes the generated
//! types plus the encoded descriptor set that server reflection serves.

pub mod v1 {
    tonic::include_proto!("stagecoach.v1");
}

/// The encoded `FileDescriptorSet` of every Stagecoach proto, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stagecoach_descriptor.bin"));

mod code;
pub mod json;

pub use code::code_name;
