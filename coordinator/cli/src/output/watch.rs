//! Live progress of one migration, as `watch` and `run --watch` show it.
//!
//! On a terminal: a header, one bar per stage (done/total, running, rate,
//! elapsed, ETA) and the latest events beneath, redrawn in place. Otherwise
//! (a pipe, a CI log): every event as a line, and a progress line for each
//! stage whose progress changed, so the output reads well in order. With
//! `--output json`: every event as a JSON line, then the final migration.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use stagecoach_proto::v1::{Event, Migration, MigrationState, StageProgress, StageState};

use super::migrations::{EventLine, state};
use super::{Out, Render, json};
use crate::args::Format;
use crate::duration::format_duration;
use crate::error::CliError;

/// How many of the latest events a terminal shows under the bars.
const EVENTS_SHOWN: usize = 6;

/// Where the progress goes.
pub enum WatchView {
    /// Bars redrawn in place on a terminal (boxed: it is large, and there
    /// is one).
    Bars(Box<Bars>),
    /// Plain lines; per stage, the progress its last line showed.
    Lines(Vec<String>),
    /// JSON lines.
    Json,
}

impl WatchView {
    /// Bars when standard output is a terminal and the format is text.
    pub fn new(format: Format) -> Self {
        match format {
            Format::Json => WatchView::Json,
            Format::Table if std::io::stdout().is_terminal() => {
                WatchView::Bars(Box::new(Bars::new()))
            }
            Format::Table => WatchView::Lines(Vec::new()),
        }
    }

    /// Shows new events and the migration as it now is.
    pub fn update(
        &mut self,
        events: &[Event],
        migration: Option<&Migration>,
    ) -> Result<(), CliError> {
        match self {
            WatchView::Bars(bars) => bars.update(events, migration),
            WatchView::Json => print_events(Format::Json, events)?,
            WatchView::Lines(shown) => {
                print_events(Format::Table, events)?;
                if let Some(m) = migration {
                    print_progress(m, shown)?;
                }
            }
        }
        Ok(())
    }

    /// Redraws what depends on the clock (elapsed, ETA).
    pub fn tick(&mut self) {
        if let WatchView::Bars(bars) = self {
            bars.redraw();
        }
    }

    /// Shows how the migration ended.
    pub fn finish(&mut self, m: &Migration) -> Result<(), CliError> {
        let format = match self {
            WatchView::Json => Format::Json,
            WatchView::Lines(_) => Format::Table,
            WatchView::Bars(bars) => {
                bars.update(&[], Some(m));
                bars.finish();
                Format::Table
            }
        };
        Out { format }.print_item(&Ended(m))
    }
}

fn print_events(format: Format, events: &[Event]) -> Result<(), CliError> {
    let out = Out { format };
    for e in events {
        out.print_item(&EventLine(e))?;
    }
    Ok(())
}

/// A line for each stage whose progress is not the one `shown` last (the
/// clock alone does not print a stage again).
fn print_progress(m: &Migration, shown: &mut Vec<String>) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    shown.resize(m.stages.len(), String::new());
    for (s, last) in m.stages.iter().zip(shown.iter_mut()) {
        let done = s.succeeded + s.failed + s.canceled;
        let progress = format!("{} {done} {} {}", s.state, s.running, s.total);
        if *last != progress {
            *last = progress;
            writeln!(stdout, "stage {}", stage_line(s, SystemTime::now()))?;
        }
    }
    stdout.flush()?;
    Ok(())
}

/// The final line: `migration 7 succeeded after 12s`.
pub struct Ended<'a>(pub &'a Migration);

impl Render for Ended<'_> {
    fn to_json(&self) -> serde_json::Value {
        json!({ "finished": json::migration(self.0) })
    }

    fn to_text(&self) -> String {
        let m = self.0;
        let since = m.admitted_at.as_ref().or(m.created_at.as_ref());
        let took = match (since, m.finished_at.as_ref()) {
            (Some(a), Some(b)) => format!(" after {}", format_duration(between(a, b))),
            _ => String::new(),
        };
        match m.state() {
            MigrationState::Succeeded => format!("migration {} succeeded{took}", m.id),
            _ if m.reason.is_empty() => format!("migration {} {}{took}", m.id, state(m)),
            _ => format!("migration {} {}{took}: {}", m.id, state(m), m.reason),
        }
    }
}

fn to_system(t: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*t).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn between(a: &prost_types::Timestamp, b: &prost_types::Timestamp) -> Duration {
    to_system(b)
        .duration_since(to_system(a))
        .unwrap_or_default()
}

/// `0 export: 3/10 done, 2 running, 1.5/s, 2.0s elapsed, ETA 4.7s`.
fn stage_line(s: &StageProgress, now: SystemTime) -> String {
    let done = s.succeeded + s.failed + s.canceled;
    let mut line = format!("{} {}: {done}/{} done", s.index, s.name, s.total);
    if s.running > 0 {
        line.push_str(&format!(", {} running", s.running));
    }
    if s.failed > 0 {
        line.push_str(&format!(", {} failed", s.failed));
    }
    line.push_str(&format!(", {}", stats(s, now)));
    line
}

/// The part of a stage's line that the clock moves: rate, elapsed, ETA (or
/// the state, before it starts and after it ends).
fn stats(s: &StageProgress, now: SystemTime) -> String {
    let state = s.state();
    let Some(started) = s.started_at.as_ref().map(to_system) else {
        return "pending".into();
    };
    let end = s.finished_at.as_ref().map_or(now, to_system);
    let elapsed = end.duration_since(started).unwrap_or_default();
    let done = s.succeeded + s.failed + s.canceled;
    let rate = f64::from(done) / elapsed.as_secs_f64().max(0.001);
    let mut text = format!("{rate:.1}/s, {} elapsed", format_duration(elapsed));
    match state {
        StageState::Running if done > 0 && done < s.total => {
            let left = f64::from(s.total - done) / rate;
            text.push_str(&format!(
                ", ETA {}",
                format_duration(Duration::from_secs_f64(left))
            ));
        }
        StageState::Running => {}
        other => text.push_str(&format!(
            ", {}",
            json::short_name(other.as_str_name(), "STAGE_STATE_")
        )),
    }
    text
}

/// The terminal display: a header, a bar per stage, the latest events.
pub struct Bars {
    multi: MultiProgress,
    header: ProgressBar,
    stages: Vec<ProgressBar>,
    event_lines: Vec<ProgressBar>,
    latest: VecDeque<String>,
    migration: Option<Migration>,
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let header = multi.add(ProgressBar::new_spinner().with_style(text_style()));
        Bars {
            multi,
            header,
            stages: Vec::new(),
            event_lines: Vec::new(),
            latest: VecDeque::new(),
            migration: None,
        }
    }

    fn update(&mut self, events: &[Event], migration: Option<&Migration>) {
        for e in events {
            self.latest.push_back(EventLine(e).to_text());
            if self.latest.len() > EVENTS_SHOWN {
                self.latest.pop_front();
            }
        }
        if let Some(m) = migration {
            self.migration = Some(m.clone());
        }
        self.redraw();
    }

    fn redraw(&mut self) {
        let Some(m) = &self.migration else { return };
        self.header.set_message(format!(
            "migration {} {}: {} of {}@{}",
            m.id,
            state(m),
            m.subject,
            m.plan_name,
            m.plan_version
        ));
        let width = m
            .stages
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0);
        while self.stages.len() < m.stages.len() {
            let bar = ProgressBar::new(0).with_style(bar_style(width));
            // Stage bars stay above the event lines.
            let bar = match self.stages.last() {
                Some(last) => self.multi.insert_after(last, bar),
                None => self.multi.insert_after(&self.header, bar),
            };
            self.stages.push(bar);
        }
        let now = SystemTime::now();
        for (s, bar) in m.stages.iter().zip(&self.stages) {
            bar.set_length(u64::from(s.total));
            bar.set_position(u64::from(s.succeeded + s.failed + s.canceled));
            bar.set_prefix(format!("{} {}", s.index, s.name));
            let mut msg = String::new();
            if s.running > 0 {
                msg.push_str(&format!("{} running, ", s.running));
            }
            if s.failed > 0 {
                msg.push_str(&format!("{} failed, ", s.failed));
            }
            msg.push_str(&stats(s, now));
            bar.set_message(msg);
        }
        while self.event_lines.len() < self.latest.len() {
            let line = self
                .multi
                .add(ProgressBar::new_spinner().with_style(text_style()));
            self.event_lines.push(line);
        }
        for (line, text) in self.event_lines.iter().zip(&self.latest) {
            line.set_message(format!("  {text}"));
        }
    }

    fn finish(&self) {
        for bar in std::iter::once(&self.header)
            .chain(&self.stages)
            .chain(&self.event_lines)
        {
            bar.finish();
        }
    }
}

fn text_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg}").expect("a valid template")
}

fn bar_style(name_width: usize) -> ProgressStyle {
    let width = name_width + 4;
    ProgressStyle::with_template(&format!(
        "{{prefix:<{width}}} [{{bar:30.cyan/blue}}] {{pos:>5}}/{{len:<5}} {{msg}}"
    ))
    .expect("a valid template")
    .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        }
    }

    #[test]
    fn a_running_stage_shows_rate_and_eta() {
        let s = StageProgress {
            index: 1,
            name: "copy".into(),
            state: StageState::Running as i32,
            total: 10,
            succeeded: 4,
            running: 2,
            started_at: Some(ts(100)),
            ..Default::default()
        };
        let now = to_system(&ts(102));
        assert_eq!(
            stage_line(&s, now),
            "1 copy: 4/10 done, 2 running, 2.0/s, 2.0s elapsed, ETA 3.0s"
        );
    }

    #[test]
    fn the_end_says_how_and_why() {
        let m = Migration {
            id: 7,
            state: MigrationState::Failed as i32,
            reason: "task 3 (fail) failed: boom".into(),
            admitted_at: Some(ts(100)),
            finished_at: Some(ts(175)),
            ..Default::default()
        };
        assert_eq!(
            Ended(&m).to_text(),
            "migration 7 failed after 1m15s: task 3 (fail) failed: boom"
        );
    }
}
