//! Helpers shared by the coordinator's test crates.

pub mod postgres;
