//! The checker's findings: per migration, ok or each violation with the
//! events that show it, then a summary line.

use serde_json::{Value as Json, json};
use stagecoach_proto::v1::Event;

use super::Render;
use super::json;
use super::migrations::{EventLine, state};
use crate::commands::verify::Verdict;

/// `stagecoach verify`.
pub struct Report<'a>(pub &'a [Verdict]);

fn shown<'e>(events: &'e [Event], ids: &[i64]) -> Vec<&'e Event> {
    ids.iter()
        .filter_map(|id| events.iter().find(|e| e.id == *id))
        .collect()
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

impl Render for Report<'_> {
    fn to_json(&self) -> Json {
        let migrations: Vec<Json> = self
            .0
            .iter()
            .map(|v| {
                let violations: Vec<Json> = v
                    .violations
                    .iter()
                    .map(|x| {
                        json!({
                            "rule": x.rule.code(),
                            "message": x.message,
                            "events": shown(&v.events, &x.events)
                                .into_iter()
                                .map(json::event)
                                .collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                json!({
                    "migration_id": v.migration.id,
                    "state": state(&v.migration),
                    "events": v.events.len(),
                    "violations": violations,
                })
            })
            .collect();
        let total: usize = self.0.iter().map(|v| v.violations.len()).sum();
        json!({ "migrations": migrations, "violations": total, "passed": total == 0 })
    }

    fn to_text(&self) -> String {
        let mut lines = Vec::new();
        for v in self.0 {
            let head = format!(
                "migration {} ({}, {})",
                v.migration.id,
                state(&v.migration),
                plural(v.events.len(), "event")
            );
            if v.violations.is_empty() {
                lines.push(format!("{head}: ok"));
                continue;
            }
            lines.push(format!(
                "{head}: {}",
                plural(v.violations.len(), "violation")
            ));
            for x in &v.violations {
                lines.push(format!("  {x}"));
                for e in shown(&v.events, &x.events) {
                    lines.push(format!("      {}", EventLine(e).to_text()));
                }
            }
        }
        let total: usize = self.0.iter().map(|v| v.violations.len()).sum();
        lines.push(format!(
            "verified {}: {}",
            plural(self.0.len(), "migration"),
            plural(total, "violation")
        ));
        lines.join("\n")
    }
}
