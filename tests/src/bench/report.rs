//! Figures, their runs and how they are shown: a table on the terminal and
//! a JSON document with every run's values, the machine, the commit and the
//! date.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::options::{Backend, Options, Sizes};
use super::stats::median;

/// An informational target; never asserted.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Target {
    /// At least this many units.
    AtLeast(f64),
    /// At most this many units.
    AtMost(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }

    fn show(self, unit: &str) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {} {unit}", num(t)),
            Target::AtMost(t) => format!("<= {} {unit}", num(t)),
        }
    }
}

/// A figure compared with a baseline figure: the ratio figure / baseline.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineLink {
    /// Key of the baseline figure.
    pub key: String,
    /// Informational target for the ratio.
    pub min_ratio: Option<f64>,
}

/// One measured quantity and its value in every run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable id, e.g. `sqlite.throughput`.
    pub key: String,
    /// What it is, for people, with its size.
    pub name: String,
    /// The backend it was measured on (`None` for backend-free baselines).
    pub backend: Option<Backend>,
    pub unit: String,
    /// The value of every run, in run order.
    pub runs: Vec<f64>,
    /// Runs that failed, with why.
    pub errors: Vec<String>,
    pub target: Option<Target>,
    pub baselines: Vec<BaselineLink>,
    /// Why it was not measured (its backend is not available).
    pub unavailable: Option<String>,
}

impl Figure {
    pub fn new(key: &str, name: &str, backend: Option<Backend>, unit: &str) -> Figure {
        Figure {
            key: key.to_string(),
            name: name.to_string(),
            backend,
            unit: unit.to_string(),
            runs: Vec::new(),
            errors: Vec::new(),
            target: None,
            baselines: Vec::new(),
            unavailable: None,
        }
    }

    pub fn target(mut self, t: Target) -> Figure {
        self.target = Some(t);
        self
    }

    pub fn baseline(mut self, key: &str, min_ratio: Option<f64>) -> Figure {
        self.baselines.push(BaselineLink {
            key: key.to_string(),
            min_ratio,
        });
        self
    }

    pub fn median(&self) -> Option<f64> {
        median(&self.runs)
    }

    fn min(&self) -> Option<f64> {
        self.runs.iter().copied().reduce(f64::min)
    }

    fn max(&self) -> Option<f64> {
        self.runs.iter().copied().reduce(f64::max)
    }
}

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_mb: u64,
    /// `/proc/loadavg` when the run started: other work on the machine
    /// makes numbers noisy.
    pub loadavg_at_start: String,
    pub os: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            memory_mb: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb / 1024),
            loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// The commit the binaries were built from.
#[derive(Debug, Clone, Serialize)]
pub struct Git {
    pub commit: String,
    /// True when the working tree had uncommitted changes.
    pub dirty: bool,
}

impl Git {
    pub fn probe() -> Git {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."));
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(root)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        Git {
            commit: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
            dirty: git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()),
        }
    }
}

/// Everything a bench run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it started, UTC, RFC 3339.
    pub date: String,
    pub git: Git,
    pub machine: Machine,
    pub quick: bool,
    /// Runs asked for.
    pub runs: u32,
    /// Runs finished (fewer than `runs` in a file written mid-way).
    pub runs_done: u32,
    pub workers: u32,
    pub slots: u32,
    pub sizes: Sizes,
    /// Backends that could not be measured, with why.
    pub unavailable: BTreeMap<String, String>,
    pub figures: Vec<Figure>,
    /// Median, min, max and ratios to baselines, per figure key.
    pub summary: BTreeMap<String, Summary>,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
}

/// The summary of one figure's runs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub target_met: Option<bool>,
    /// Baseline key → figure median / baseline median.
    pub ratios: BTreeMap<String, f64>,
}

impl Report {
    pub fn new(opts: &Options, date: String, git: Git, machine: Machine) -> Report {
        Report {
            date,
            git,
            machine,
            quick: opts.quick,
            runs: opts.runs,
            runs_done: 0,
            workers: opts.workers,
            slots: opts.slots,
            sizes: opts.sizes(),
            unavailable: BTreeMap::new(),
            figures: Vec::new(),
            summary: BTreeMap::new(),
            duration_s: 0.0,
        }
    }

    pub fn figure(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }

    /// Records one run's value (or its failure) of figure `key`.
    pub fn record(&mut self, key: &str, value: Result<f64, String>) {
        let Some(f) = self.figures.iter_mut().find(|f| f.key == key) else {
            panic!("bench: no figure {key:?} in the catalog");
        };
        match value {
            Ok(v) => f.runs.push(v),
            Err(e) => f.errors.push(e),
        }
    }

    /// Marks a backend's figures as not measurable.
    pub fn set_unavailable(&mut self, backend: Backend, why: &str) {
        self.unavailable
            .insert(backend.name().to_string(), why.to_string());
        for f in self
            .figures
            .iter_mut()
            .filter(|f| f.backend == Some(backend))
        {
            f.unavailable = Some(why.to_string());
        }
    }

    /// Fills `summary` from the runs.
    pub fn summarise(&mut self) {
        let medians: BTreeMap<String, Option<f64>> = self
            .figures
            .iter()
            .map(|f| (f.key.clone(), f.median()))
            .collect();
        self.summary = self
            .figures
            .iter()
            .map(|f| {
                let m = f.median();
                let ratios = f
                    .baselines
                    .iter()
                    .filter_map(|b| {
                        let base = medians.get(&b.key).copied().flatten()?;
                        Some((b.key.clone(), m? / base))
                    })
                    .collect();
                let s = Summary {
                    median: m,
                    min: f.min(),
                    max: f.max(),
                    target_met: f.target.zip(m).map(|(t, m)| t.met(m)),
                    ratios,
                };
                (f.key.clone(), s)
            })
            .collect();
    }

    /// Figures with failed runs.
    pub fn failures(&self) -> Vec<&Figure> {
        self.figures
            .iter()
            .filter(|f| !f.errors.is_empty())
            .collect()
    }

    /// The table for the terminal.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 7]> = vec![[
            "figure".into(),
            "median".into(),
            "min..max".into(),
            "unit".into(),
            "baseline".into(),
            "ratio".into(),
            "target (info)".into(),
        ]];
        let mut notes = Vec::new();
        for f in &self.figures {
            let prefix = f.backend.map_or("-", Backend::name);
            let name = format!("{prefix:<8} {}", f.name);
            if let Some(why) = &f.unavailable {
                let note = format!("{prefix}: not available: {why}");
                if !notes.contains(&note) {
                    notes.push(note);
                }
                rows.push([
                    name,
                    "n/a".into(),
                    String::new(),
                    f.unit.clone(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
                continue;
            }
            let s = &self.summary[&f.key];
            let failed = if f.errors.is_empty() {
                String::new()
            } else {
                format!(" ({} failed)", f.errors.len())
            };
            let target = f.target.map_or(String::new(), |t| {
                let mark = match s.target_met {
                    Some(true) => " met",
                    Some(false) => " missed",
                    None => "",
                };
                format!("{}{mark}", t.show(&f.unit))
            });
            let link = |b: &BaselineLink| {
                let base = self.figure(&b.key);
                let base_text = base.map_or(b.key.clone(), |bf| {
                    let v = bf.median().map_or("-".into(), num);
                    format!("{} {v} {}", short(&bf.key), bf.unit)
                });
                let ratio = s
                    .ratios
                    .get(&b.key)
                    .map_or("-".into(), |r| format!("{r:.2}x"));
                let ratio_target = b.min_ratio.map(|r| {
                    let met = s.ratios.get(&b.key).map(|&x| x >= r);
                    let mark = match met {
                        Some(true) => " met",
                        Some(false) => " missed",
                        None => "",
                    };
                    format!(">= {r}x {}{mark}", short(&b.key))
                });
                (base_text, ratio, ratio_target)
            };
            let mut links = f.baselines.iter().map(link);
            let (base, ratio, ratio_target) =
                links.next().unwrap_or((String::new(), String::new(), None));
            let target = match (target.is_empty(), &ratio_target) {
                (_, None) => target,
                (true, Some(r)) => r.clone(),
                (false, Some(r)) => format!("{target}; {r}"),
            };
            rows.push([
                format!("{name}{failed}"),
                s.median.map_or("-".into(), num),
                match (s.min, s.max) {
                    (Some(a), Some(b)) => format!("{}..{}", num(a), num(b)),
                    _ => "-".into(),
                },
                f.unit.clone(),
                base,
                ratio,
                target,
            ]);
            for (base, ratio, ratio_target) in links {
                rows.push([
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    base,
                    ratio,
                    ratio_target.unwrap_or_default(),
                ]);
            }
        }
        let widths: Vec<usize> = (0..7)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, r) in rows.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                // Numbers right-aligned, text left-aligned.
                if (1..=2).contains(&c) || c == 5 {
                    let _ = write!(line, "{cell:>w$}  ", w = widths[c]);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * 6;
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
        out
    }
}

/// The baseline's short name in the table: `echo`, `sqlx tx`, `sqlx tx p99`.
fn short(key: &str) -> String {
    let name = key.split_once('.').map_or(key, |(_, name)| name);
    name.replace("sqlx_tx", "sqlx tx").replace('_', " ")
}

/// A count for people: `10,000`.
pub fn count(n: u64) -> String {
    if n >= 1_000 {
        num(n as f64)
    } else {
        n.to_string()
    }
}

/// A number for people: thousands separated, precision by magnitude.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.abs() >= 1_000.0 {
        let n = v.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        if n < 0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The current time, UTC, as RFC 3339 (`2024-05-01T12:34:56Z`).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(num(1_234_567.4), "1,234,567");
        assert_eq!(num(12_345.0), "12,345");
        assert_eq!(num(999.4), "999");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(0.456), "0.46");
        assert_eq!(count(50), "50");
        assert_eq!(count(1_000_100), "1,000,100");
    }

    #[test]
    fn baselines_have_short_names() {
        assert_eq!(short("echo"), "echo");
        assert_eq!(short("postgres.sqlx_tx"), "sqlx tx");
        assert_eq!(short("sqlite.sqlx_tx_p99"), "sqlx tx p99");
    }

    #[test]
    fn dates_are_rfc3339() {
        let d = now_utc();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }
}
