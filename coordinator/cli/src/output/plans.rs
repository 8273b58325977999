//! Views of plans: the list, one plan with its stages and tasks, and what
//! `plan put` stored.

use serde_json::{Value as Json, json};
use stagecoach_proto::json::struct_to_json;
use stagecoach_proto::v1::{Plan, StageSpec};

use super::Render;
use super::json;
use super::table::Table;

/// `export ×1, sleep ×3`: how many tasks of each kind a stage declares.
fn kinds(s: &StageSpec) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for t in &s.tasks {
        match counts.iter_mut().find(|(k, _)| *k == t.kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((&t.kind, 1)),
        }
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mode(s: &StageSpec) -> &'static str {
    match (s.serial, s.dynamic) {
        (true, true) => "serial, dynamic",
        (true, false) => "serial",
        (false, true) => "dynamic",
        (false, false) => "parallel",
    }
}

/// `stagecoach plan list` (stages come without their tasks).
pub struct PlanList<'a>(pub &'a [Plan]);

impl Render for PlanList<'_> {
    fn to_json(&self) -> Json {
        Json::Array(self.0.iter().map(json::plan).collect())
    }

    fn to_text(&self) -> String {
        let mut t = Table::new(&["NAME", "VERSION", "STAGES", "DESCRIPTION"]);
        for p in self.0 {
            let stages: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            t.row(vec![
                p.name.clone(),
                p.version.to_string(),
                stages.join(" → "),
                p.description.clone(),
            ]);
        }
        t.render_or("no plans")
    }
}

/// `stagecoach plan show`.
pub struct PlanDetail<'a>(pub &'a Plan);

impl Render for PlanDetail<'_> {
    fn to_json(&self) -> Json {
        json::plan(self.0)
    }

    fn to_text(&self) -> String {
        let p = self.0;
        let mut out = format!("plan {} version {}", p.name, p.version);
        if !p.description.is_empty() {
            out.push_str(&format!(": {}", p.description));
        }
        let mut t = Table::new(&["#", "STAGE", "MODE", "TASKS", "KINDS"]);
        for (i, s) in p.stages.iter().enumerate() {
            t.row(vec![
                i.to_string(),
                s.name.clone(),
                mode(s).to_string(),
                s.tasks.len().to_string(),
                kinds(s),
            ]);
        }
        out.push_str("\n\n");
        out.push_str(&t.render_or("no stages"));
        let mut tasks = Table::new(&["STAGE", "KIND", "PAYLOAD"]);
        for s in &p.stages {
            for task in &s.tasks {
                tasks.row(vec![
                    s.name.clone(),
                    task.kind.clone(),
                    struct_to_json(task.payload.as_ref()).to_string(),
                ]);
            }
        }
        out.push_str("\n\n");
        out.push_str(&tasks.render_or("no tasks declared"));
        out
    }
}

/// What `plan put` stored.
pub struct PlanStored<'a>(pub &'a Plan);

impl Render for PlanStored<'_> {
    fn to_json(&self) -> Json {
        json!({ "name": self.0.name, "version": self.0.version })
    }

    fn to_text(&self) -> String {
        let p = self.0;
        let tasks: usize = p.stages.iter().map(|s| s.tasks.len()).sum();
        format!(
            "plan {} version {} stored: {} stages, {tasks} tasks",
            p.name,
            p.version,
            p.stages.len()
        )
    }
}
