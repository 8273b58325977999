//! `chaos`: random, seeded faults against a cluster of real processes; see
//! [`stagecoach_tests::chaos`]. Only finds the executables, parses flags,
//! prints the report and sets the exit code.

use std::process::ExitCode;

use clap::Parser;
use stagecoach_tests::bench::procs::Executables;
use stagecoach_tests::chaos::{self, Options};

fn main() -> ExitCode {
    let opts = Options::parse();
    if let Err(e) = Executables::point_harness_at_them() {
        eprintln!("chaos: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    match runtime.block_on(chaos::run(opts)) {
        Ok(report) => {
            println!("{report}");
            if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::FAILURE
        }
    }
}
