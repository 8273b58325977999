//! One clock for every timestamp the coordinator writes. On SQLite the
//! coordinator is the only writer, so its wall clock is the clock (DESIGN.md,
//! "Leases"); times are milliseconds since the Unix epoch, stored as integers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
