//! The fuzzer's counts and the table it prints.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tonic::Code;

/// Everything a run counted.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub backend: String,
    pub seed: u64,
    pub requests: u64,
    pub elapsed: Duration,
    /// Answers by RPC (`raw-tcp`, `raw` for raw frames) and code.
    pub codes: BTreeMap<(String, String), u64>,
    /// Answers matched by a known finding, by its name.
    pub known: BTreeMap<&'static str, u64>,
    /// RSS of the coordinator in KiB: before, peak, after.
    pub rss_kib: (u64, u64, u64),
    pub health_checks: u64,
    pub migrations_checked: usize,
    /// Migrations by final state.
    pub migration_states: BTreeMap<String, usize>,
    /// Each violation, with the seed and request that caused it.
    pub violations: Vec<String>,
}

impl Report {
    pub fn count(&mut self, rpc: &str, code: Option<Code>) {
        let code = code.map_or("no status".to_string(), |c| format!("{c:?}"));
        *self.codes.entry((rpc.to_string(), code)).or_default() += 1;
    }

    /// An answer of the HTTP port: its status code, or none.
    pub fn count_http(&mut self, rpc: &str, status: Option<u16>) {
        let code = status.map_or("no status".to_string(), |c| format!("HTTP {c}"));
        *self.codes.entry((rpc.to_string(), code)).or_default() += 1;
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fuzz on {}, seed {}: {} requests in {:.1?} ({:.0}/s)",
            self.backend,
            self.seed,
            self.requests,
            self.elapsed,
            self.rate()
        )?;
        let mut by_rpc: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
        for ((rpc, code), n) in &self.codes {
            by_rpc.entry(rpc).or_default().push((code, *n));
        }
        writeln!(f, "{:<18} {:>9}  codes", "rpc", "requests")?;
        for (rpc, codes) in &by_rpc {
            let total: u64 = codes.iter().map(|(_, n)| n).sum();
            let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            writeln!(f, "{rpc:<18} {total:>9}  {}", codes.join(", "))?;
        }
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for ((_, code), n) in &self.codes {
            *totals.entry(code).or_default() += n;
        }
        let totals: Vec<String> = totals.iter().map(|(c, n)| format!("{c} {n}")).collect();
        writeln!(f, "codes: {}", totals.join(", "))?;
        for (name, n) in &self.known {
            writeln!(f, "known finding {name}: {n} answers")?;
        }
        let mb = |k: u64| k as f64 / 1024.0;
        writeln!(
            f,
            "coordinator RSS: before {:.1} MB, peak {:.1} MB, after {:.1} MB; {} health checks",
            mb(self.rss_kib.0),
            mb(self.rss_kib.1),
            mb(self.rss_kib.2),
            self.health_checks
        )?;
        writeln!(
            f,
            "migrations checked: {} {:?}",
            self.migrations_checked, self.migration_states
        )?;
        for v in self.violations.iter().take(50) {
            writeln!(f, "VIOLATION: {v}")?;
        }
        write!(
            f,
            "{} requests, {} migrations, {} violations",
            self.requests,
            self.migrations_checked,
            self.violations.len()
        )
    }
}
