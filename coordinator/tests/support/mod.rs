//! Helpers shared by the coordinator's test crates.
#![allow(dead_code)]

pub mod contract;
pub mod postgres;
