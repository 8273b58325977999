//! One module per command group; each turns its arguments into calls and
//! hands the answers to a view of [`crate::output`]. [`run`] dispatches.

pub mod admin;
pub mod events;
pub mod migrations;
pub mod plans;
pub mod verify;
pub mod watch;

use crate::args::{Cli, Command, PlanCommand};
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::plan_file;

/// How a command that ran ends, apart from errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did what was asked and what it checked is fine.
    Success,
    /// It ran, and found a failure: the watched migration failed or was
    /// canceled, or verify found a violation.
    Failure,
}

/// Runs the command line's command.
pub async fn run(cli: Cli) -> Result<Outcome, CliError> {
    let out = Out {
        format: cli.global.output,
    };
    // A bad plan file is reported before anything is sent.
    let plan_json = match &cli.command {
        Command::Plan(PlanCommand::Put { file }) => Some(plan_file::read(file)?),
        _ => None,
    };
    let session = Session::connect(&cli.global).await?;
    let s = &session;
    match cli.command {
        Command::Plan(PlanCommand::Put { .. }) => {
            plans::put(s, out, plan_json.unwrap_or_default()).await
        }
        Command::Plan(PlanCommand::List) => plans::list(s, out).await,
        Command::Plan(PlanCommand::Show { name, version }) => {
            plans::show(s, out, &name, version).await
        }
        Command::Run(args) => migrations::run(s, out, args).await,
        Command::List(args) => migrations::list(s, out, args).await,
        Command::Show { id } => migrations::show(s, out, id).await,
        Command::Status { subject } => migrations::status(s, out, &subject).await,
        Command::Watch { id } => watch::watch(s, out, id).await,
        Command::Cancel { id, reason } => migrations::cancel(s, out, id, reason).await,
        Command::Retry { id } => migrations::retry(s, out, id).await,
        Command::Events { id, follow } => events::events(s, out, id, follow).await,
        Command::Pools => admin::pools(s, out).await,
        Command::Pool(cmd) => admin::pool(s, out, cmd).await,
        Command::Workers => admin::workers(s, out).await,
        Command::Drain { worker } => admin::drain(s, out, worker, true).await,
        Command::Undrain { worker } => admin::drain(s, out, worker, false).await,
        Command::Verify(args) => verify::verify(s, out, args).await,
    }
}

/// A field the coordinator always sets, or an error naming it.
pub fn need<T>(value: Option<T>, rpc: &'static str, field: &'static str) -> Result<T, CliError> {
    value.ok_or(CliError::Incomplete { rpc, field })
}
