//! `stagecoach`: the operator command line of a Stagecoach coordinator,
//! over its gRPC API (what grpcurl users did by hand).
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | [`args`] | the command line (clap), flags with environment fallbacks, value parsers |
//! | [`connect`] | the channel (plain or TLS) and the bearer token: [`connect::Session`] |
//! | [`commands`] | one module per command group: arguments in, calls out, answers to a view |
//! | [`output`] | the views: aligned text or JSON, and the live progress of `watch` |
//! | [`plan_file`] | plan files in JSON or YAML |
//! | [`duration`] | `2h`, `90s`, `1h30m` |
//! | [`error`] | [`error::CliError`], printed as one line |
//!
//! Exit status: 0 success; 1 a watched migration failed or was canceled, or
//! verify found a violation; 2 an error (a refused call, bad flags, no
//! connection).

mod args;
mod commands;
mod connect;
mod duration;
mod error;
mod output;
mod plan_file;

use std::process::ExitCode;

use clap::Parser;

use crate::commands::Outcome;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli).await {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failure) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
