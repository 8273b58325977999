//! `bench`: measures a real coordinator and real workers; see
//! [`stagecoach_tests::bench`]. Only parses flags and sets the exit code.

use std::process::ExitCode;

use clap::Parser;
use stagecoach_tests::bench::{self, Options};

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Options::parse();
    match bench::run(opts).await {
        Ok((report, _)) if report.failures().is_empty() => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("bench: some measurements failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
