//! `fuzz`: hostile input against a live coordinator; see
//! [`stagecoach_tests::fuzz`]. Only finds the executables, parses flags,
//! prints the report and sets the exit code.

use std::process::ExitCode;

use clap::Parser;
use stagecoach_tests::bench::procs::Executables;
use stagecoach_tests::fuzz::{self, Options};

fn main() -> ExitCode {
    let opts = Options::parse();
    if let Err(e) = Executables::point_harness_at_them() {
        eprintln!("fuzz: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    match runtime.block_on(fuzz::run(opts)) {
        Ok(report) => {
            println!("{report}");
            if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("fuzz: {e:#}");
            ExitCode::FAILURE
        }
    }
}
