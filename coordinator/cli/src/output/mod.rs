//! Output formatting, apart from the commands: each result is a view that
//! renders as aligned text for people or as JSON for scripts
//! ([`Render`]); [`Out`] prints it in the format `--output` chose.
//!
//! | module | what it renders |
//! |---|---|
//! | [`json`] | the protocol's messages as JSON values (shared by every view) |
//! | [`table`] | [`table::Table`]: aligned columns |
//! | [`migrations`] | migrations, subject status, events |
//! | [`plans`] | plans |
//! | [`admin`] | pools and workers |
//! | [`verify`] | the checker's findings |
//! | [`watch`] | live progress: bars on a terminal, lines otherwise |

pub mod admin;
pub mod json;
pub mod migrations;
pub mod plans;
pub mod table;
pub mod verify;
pub mod watch;

use std::io::Write;

use serde_json::Value as Json;

use crate::args::Format;
use crate::error::CliError;

/// A result that can be printed either way.
pub trait Render {
    /// The JSON document.
    fn to_json(&self) -> Json;
    /// Text for people, ending without a newline.
    fn to_text(&self) -> String;
}

/// Prints results to standard output in one format.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// The format `--output` chose.
    pub format: Format,
}

impl Out {
    /// Prints `value`: text, or pretty JSON.
    pub fn print(&self, value: &dyn Render) -> Result<(), CliError> {
        let text = match self.format {
            Format::Table => value.to_text(),
            Format::Json => pretty(&value.to_json()),
        };
        self.write_line(&text)
    }

    /// Prints one item of a stream: text, or one compact JSON line.
    pub fn print_item(&self, value: &dyn Render) -> Result<(), CliError> {
        let text = match self.format {
            Format::Table => value.to_text(),
            Format::Json => value.to_json().to_string(),
        };
        self.write_line(&text)
    }

    fn write_line(&self, text: &str) -> Result<(), CliError> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}")?;
        stdout.flush()?;
        Ok(())
    }
}

fn pretty(json: &Json) -> String {
    serde_json::to_string_pretty(json).unwrap_or_else(|_| json.to_string())
}
