//! The command line, as clap derives it: global connection flags (each with
//! an environment fallback) and one subcommand per operator action. Values
//! are parsed here (durations, `k=v` parameters, states) so that a bad one is
//! refused before anything is sent, naming its flag.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value as Json;
use stagecoach_proto::v1::MigrationState;

use crate::duration::parse_duration;

/// Operate a Stagecoach coordinator: plans, migrations, pools, workers, and
/// the invariant checker over the event log.
#[derive(Debug, Parser)]
#[command(name = "stagecoach", version, about)]
#[command(
    after_help = "Exit status: 0 success; 1 the migration failed or was canceled \
    (run --watch, watch) or verify found a violation; 2 an error (the coordinator refused \
    a call, bad flags, no connection)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the coordinator and how to print.
#[derive(Debug, Args)]
pub struct Global {
    /// gRPC address of the coordinator (`http://host:port`, or `https://`
    /// for TLS).
    #[arg(
        long,
        global = true,
        env = "STAGECOACH_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,

    /// Bearer token (a `client`, `viewer` or `admin` token from
    /// `coordinator token create`), sent as `authorization: Bearer TOKEN`.
    #[arg(long, global = true, env = "STAGECOACH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file whose first line is the bearer token, instead of --token:
    /// keeps the secret out of the process list.
    #[arg(
        long,
        global = true,
        env = "STAGECOACH_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,

    /// PEM file with the CA certificate(s) to trust for an `https://`
    /// coordinator [default: the system's trusted roots].
    #[arg(long, global = true, env = "STAGECOACH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate to present to a coordinator that requires client
    /// certificates; with --tls-client-key.
    #[arg(long, global = true, env = "STAGECOACH_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of --tls-client-cert.
    #[arg(long, global = true, env = "STAGECOACH_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,

    /// How to print results: aligned text, or JSON (one document; one per
    /// line for streams: `events`, `watch`).
    #[arg(long, short, global = true, env = "STAGECOACH_OUTPUT", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns and short lines, for people.
    Table,
    /// JSON, for scripts.
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store, list and show plans.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Start a migration of a stored plan for a subject.
    Run(RunArgs),
    /// List migrations, newest first.
    List(ListArgs),
    /// Show one migration with its stages' progress.
    Show {
        /// Migration id.
        id: i64,
    },
    /// Show what a subject's migrations amount to (none, queued, running,
    /// finished, regenerating, failed).
    Status {
        /// The subject, e.g. `project/42`.
        subject: String,
    },
    /// Follow a migration live until it ends: one progress bar per stage,
    /// the latest events beneath. Exit 0 when it succeeds, 1 when it fails
    /// or is canceled.
    Watch {
        /// Migration id.
        id: i64,
    },
    /// Cancel a queued or running migration.
    Cancel {
        /// Migration id.
        id: i64,
        /// Why; recorded as the migration's reason.
        #[arg(long, default_value = "canceled by the operator")]
        reason: String,
    },
    /// Run a failed or canceled migration again from its first unfinished
    /// stage.
    Retry {
        /// Migration id.
        id: i64,
    },
    /// Print a migration's event log, oldest first.
    Events {
        /// Migration id.
        id: i64,
        /// Keep printing new events until the migration ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// List the capacity pools and their usage.
    Pools,
    /// Create and change pools.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// List the workers connected to the coordinator.
    Workers,
    /// Stop giving a worker new tasks; it finishes those it holds.
    Drain {
        /// Worker id.
        worker: String,
    },
    /// Give a drained worker new tasks again.
    Undrain {
        /// Worker id.
        worker: String,
    },
    /// Run the invariant checker on migrations' event logs (read through
    /// the API). Exit 1 when it finds a violation.
    Verify(VerifyArgs),
}

/// `stagecoach plan …`.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Store a plan from a JSON or YAML file (the fields of `Plan`:
    /// name, description, stages with name, serial, dynamic, retry and
    /// tasks of kind, payload, max_attempts, retry). Storing a name again
    /// makes a new version.
    Put {
        /// The plan file: `.json` is read as JSON, anything else as YAML
        /// (JSON is YAML too); `-` reads standard input. A PutPlan request
        /// (`{plan: {...}}` or `{plan_json: "..."}`) is read as its plan.
        file: PathBuf,
    },
    /// List the latest version of every plan.
    List,
    /// Show a plan with its stages and tasks.
    Show {
        /// Plan name.
        name: String,
        /// Only if the latest version is this one (the coordinator serves
        /// only the latest version).
        #[arg(long)]
        version: Option<u32>,
    },
}

/// `stagecoach run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of a stored plan (its latest version runs).
    pub plan: String,
    /// What is migrated, e.g. `project/42`.
    #[arg(long)]
    pub subject: String,
    /// A parameter handed to every task, `key=value`; the value is read as
    /// JSON when it parses (`rows=3`, `full=true`, `tables=["a"]`), else
    /// as a string. Repeat for more.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub params: Vec<(String, Json)>,
    /// Pool whose slots it uses [default: the coordinator's `default`].
    #[arg(long)]
    pub pool: Option<String>,
    /// How long it may take from now, e.g. `90s`, `2h`, `1h30m`; past it
    /// the migration fails with reason `deadline exceeded`.
    #[arg(long, value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// Repeating a run with the same key returns the first run's migration
    /// instead of starting another.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow it like `stagecoach watch` until it ends.
    #[arg(long)]
    pub watch: bool,
}

/// `stagecoach list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only migrations in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateFilter>,
    /// Only migrations of this subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// Only migrations in this pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
}

/// A migration state to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl From<StateFilter> for MigrationState {
    fn from(s: StateFilter) -> Self {
        match s {
            StateFilter::Queued => MigrationState::Queued,
            StateFilter::Running => MigrationState::Running,
            StateFilter::Succeeded => MigrationState::Succeeded,
            StateFilter::Failed => MigrationState::Failed,
            StateFilter::Canceled => MigrationState::Canceled,
        }
    }
}

/// `stagecoach pool …`.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool.
    Create {
        /// Name, 1-100 characters of [A-Za-z0-9._-].
        name: String,
        /// Migrations of the pool that may run at once.
        #[arg(long)]
        slots: u32,
    },
    /// Change a pool's number of slots (queued migrations are admitted at
    /// once if slots were added).
    SetSlots {
        /// Pool name.
        name: String,
        /// New number of slots.
        slots: u32,
    },
    /// Stop admitting migrations into a pool (running ones continue).
    Pause {
        /// Pool name.
        name: String,
    },
    /// Admit migrations into a paused pool again.
    Resume {
        /// Pool name.
        name: String,
    },
}

/// `stagecoach verify`.
#[derive(Debug, Args)]
#[group(id = "which", required = true, multiple = false, args = ["id", "all"])]
pub struct VerifyArgs {
    /// Migration id.
    pub id: Option<i64>,
    /// Every migration the coordinator lists.
    #[arg(long)]
    pub all: bool,
}

/// `--param key=value`.
fn parse_param(text: &str) -> Result<(String, Json), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, e.g. rows=3 or name=alice, got {text:?}"))?;
    if key.is_empty() {
        return Err(format!("the key before '=' is empty in {text:?}"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_string()));
    Ok((key.to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn params_are_json_when_they_parse() {
        assert_eq!(parse_param("rows=3").unwrap(), ("rows".into(), 3.into()));
        assert_eq!(
            parse_param("name=alice").unwrap(),
            ("name".into(), "alice".into())
        );
        assert_eq!(parse_param("q=a=b").unwrap(), ("q".into(), "a=b".into()));
        assert!(parse_param("rows").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_param("=3").unwrap_err().contains("key"));
    }

    #[test]
    fn a_bad_deadline_names_the_flag() {
        let e = Cli::try_parse_from([
            "stagecoach",
            "run",
            "p",
            "--subject",
            "s",
            "--deadline",
            "2x",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--deadline"), "{e}");
        assert!(e.contains("1h30m"), "{e}");
    }

    #[test]
    fn verify_needs_an_id_or_all() {
        assert!(Cli::try_parse_from(["stagecoach", "verify"]).is_err());
        assert!(Cli::try_parse_from(["stagecoach", "verify", "3", "--all"]).is_err());
        assert!(Cli::try_parse_from(["stagecoach", "verify", "--all"]).is_ok());
    }
}
