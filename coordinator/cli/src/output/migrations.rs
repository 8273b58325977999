//! Views of migrations: a list, one in detail with its stages, what `run`,
//! `cancel` and `retry` did, a subject's status, and event lines.

use serde_json::{Value as Json, json};
use stagecoach_proto::json::struct_to_json;
use stagecoach_proto::v1::{Event, GetSubjectStatusResponse, Migration, StageProgress};
use stagecoach_verify::describe_event;

use super::Render;
use super::json::{self, short_name};
use super::table::Table;

/// `queued`, `running`, …
pub fn state(m: &Migration) -> String {
    short_name(m.state().as_str_name(), "MIGRATION_STATE_")
}

fn stage_state(s: &StageProgress) -> String {
    short_name(s.state().as_str_name(), "STAGE_STATE_")
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map_or_else(|| "-".to_string(), ToString::to_string)
}

/// `plan@3`, or `(inline)@1` for an inline plan.
fn plan_of(m: &Migration) -> String {
    let name = if m.plan_name.is_empty() {
        "(inline)"
    } else {
        &m.plan_name
    };
    format!("{name}@{}", m.plan_version)
}

/// `2/3` stages succeeded.
fn stages_done(m: &Migration) -> String {
    let done = m
        .stages
        .iter()
        .filter(|s| stage_state(s) == "succeeded")
        .count();
    format!("{done}/{}", m.stages.len())
}

/// `stagecoach list`.
pub struct MigrationList<'a>(pub &'a [Migration]);

impl Render for MigrationList<'_> {
    fn to_json(&self) -> Json {
        Json::Array(self.0.iter().map(json::migration).collect())
    }

    fn to_text(&self) -> String {
        let mut t = Table::new(&[
            "ID", "STATE", "PLAN", "SUBJECT", "POOL", "STAGES", "CREATED", "REASON",
        ]);
        for m in self.0 {
            t.row(vec![
                m.id.to_string(),
                state(m),
                plan_of(m),
                m.subject.clone(),
                m.pool.clone(),
                stages_done(m),
                time(m.created_at.as_ref()),
                m.reason.clone(),
            ]);
        }
        t.render_or("no migrations")
    }
}

/// `stagecoach show`.
pub struct MigrationDetail<'a>(pub &'a Migration);

impl Render for MigrationDetail<'_> {
    fn to_json(&self) -> Json {
        json::migration(self.0)
    }

    fn to_text(&self) -> String {
        let m = self.0;
        let mut lines = vec![
            format!("migration {}  {}", m.id, state(m)),
            format!("plan:        {}", plan_of(m)),
            format!("subject:     {}", m.subject),
            format!("pool:        {}", m.pool),
            format!("parameters:  {}", struct_to_json(m.parameters.as_ref())),
            format!("created:     {}", time(m.created_at.as_ref())),
            format!("admitted:    {}", time(m.admitted_at.as_ref())),
            format!("finished:    {}", time(m.finished_at.as_ref())),
        ];
        if m.deadline.is_some() {
            lines.push(format!("deadline:    {}", time(m.deadline.as_ref())));
        }
        if !m.idempotency_key.is_empty() {
            lines.push(format!("idempotency: {}", m.idempotency_key));
        }
        if !m.reason.is_empty() {
            lines.push(format!("reason:      {}", m.reason));
        }
        let mut t = Table::new(&[
            "#", "STAGE", "STATE", "DONE", "RUNNING", "FAILED", "CANCELED", "STARTED", "FINISHED",
        ]);
        for s in &m.stages {
            t.row(vec![
                s.index.to_string(),
                s.name.clone(),
                stage_state(s),
                format!("{}/{}", s.succeeded, s.total),
                s.running.to_string(),
                s.failed.to_string(),
                s.canceled.to_string(),
                time(s.started_at.as_ref()),
                time(s.finished_at.as_ref()),
            ]);
        }
        lines.push(String::new());
        lines.push(t.render_or("no stages"));
        lines.join("\n")
    }
}

/// What `run` got back.
pub struct Created<'a> {
    pub migration: &'a Migration,
    /// False when an earlier run with the same idempotency key made it.
    pub created: bool,
}

impl Render for Created<'_> {
    fn to_json(&self) -> Json {
        json!({ "created": self.created, "migration": json::migration(self.migration) })
    }

    fn to_text(&self) -> String {
        let m = self.migration;
        let how = if self.created {
            "created"
        } else {
            "already exists for this idempotency key"
        };
        format!(
            "migration {} {how}: {} of {} in pool {}, {}",
            m.id,
            m.subject,
            plan_of(m),
            m.pool,
            state(m)
        )
    }
}

/// What `cancel` or `retry` left.
pub struct Changed<'a>(pub &'a Migration);

impl Render for Changed<'_> {
    fn to_json(&self) -> Json {
        json::migration(self.0)
    }

    fn to_text(&self) -> String {
        let m = self.0;
        if m.reason.is_empty() {
            format!("migration {}: {}", m.id, state(m))
        } else {
            format!("migration {}: {} ({})", m.id, state(m), m.reason)
        }
    }
}

/// `stagecoach status`.
pub struct SubjectStatus<'a> {
    pub subject: &'a str,
    pub status: &'a GetSubjectStatusResponse,
}

impl Render for SubjectStatus<'_> {
    fn to_json(&self) -> Json {
        let s = self.status;
        json!({
            "subject": self.subject,
            "status": short_name(s.status().as_str_name(), "SUBJECT_STATUS_"),
            "latest": s.latest.as_ref().map(json::migration),
            "last_succeeded": s.last_succeeded.as_ref().map(json::migration),
        })
    }

    fn to_text(&self) -> String {
        let s = self.status;
        let mut line = format!(
            "{}: {}",
            self.subject,
            short_name(s.status().as_str_name(), "SUBJECT_STATUS_")
        );
        if let Some(m) = &s.latest {
            line.push_str(&format!("; latest migration {} {}", m.id, state(m)));
            if !m.reason.is_empty() {
                line.push_str(&format!(" ({})", m.reason));
            }
        }
        if let Some(m) = &s.last_succeeded {
            line.push_str(&format!(
                "; last succeeded {} at {}",
                m.id,
                time(m.finished_at.as_ref())
            ));
        }
        line
    }
}

/// One event: `2026-12-07T23:00:00Z  #12 TASK_ASSIGNED stage=0 task=5 …`.
pub struct EventLine<'a>(pub &'a Event);

impl Render for EventLine<'_> {
    fn to_json(&self) -> Json {
        json::event(self.0)
    }

    fn to_text(&self) -> String {
        format!("{}  {}", time(self.0.at.as_ref()), describe_event(self.0))
    }
}
