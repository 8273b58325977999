//! `chaos`: random, seeded faults against a cluster of real processes; see
//! [`stagecoach_tests::chaos`]. Only finds the executables, parses flags,
//! prints the report and sets the exit code.

use std::process::ExitCode;

use clap::Parser;
use stagecoach_tests::bench::procs::Executables;
use stagecoach_tests::chaos::{self, Options};

fn main() -> ExitCode {
    let opts = Options::parse();
    // The e2e harness finds the executables beside a test binary under
    // `<profile>/deps/`, which a `[[bin]]` is not: build them with this
    // binary's profile (as `fuzz` does) and point the harness at them.
    if std::env::var_os("STAGECOACH_BIN_DIR").is_none() {
        let dir = match Executables::locate_or_build(None) {
            Ok(exes) => exes.coordinator.parent().map(|d| d.to_path_buf()),
            Err(e) => {
                eprintln!("chaos: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(dir) = dir {
            // SAFETY: no other thread exists yet (the runtime starts below).
            unsafe { std::env::set_var("STAGECOACH_BIN_DIR", dir) };
        }
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
