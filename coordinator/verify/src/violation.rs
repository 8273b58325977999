//! What the checker finds: a [`Violation`] names its [`Rule`], says what is
//! wrong in one line, and lists the ids of the events that show it, so a
//! reader (a test's panic message, `stagecoach verify`) can print them beside
//! it.

use std::fmt;

/// The rule a violation breaks, as the crate docs list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// The log itself is malformed (ids, order, phases).
    Log,
    /// I1 stage order.
    StageOrder,
    /// I2 one stage at a time.
    OneStageAtATime,
    /// I4 fencing: every attempt explained, outcomes of the live attempt.
    Fencing,
    /// I5 one outcome per task; counters that add up.
    OneOutcome,
    /// I7 bounded retries.
    BoundedRetries,
    /// I9 nothing assigned after cancel.
    Cancel,
    /// I10 deadline.
    Deadline,
}

impl Rule {
    /// The short name violations start with: `log`, `I1`, … `I10`.
    pub fn code(self) -> &'static str {
        match self {
            Rule::Log => "log",
            Rule::StageOrder => "I1",
            Rule::OneStageAtATime => "I2",
            Rule::Fencing => "I4",
            Rule::OneOutcome => "I5",
            Rule::BoundedRetries => "I7",
            Rule::Cancel => "I9",
            Rule::Deadline => "I10",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule it breaks.
    pub rule: Rule,
    /// What is wrong, usually ending with the event at fault as
    /// [`crate::describe_event`] writes it.
    pub message: String,
    /// Ids of the events that show it, oldest first; empty when it is about
    /// the migration's counters rather than its log.
    pub events: Vec<i64>,
}

impl Violation {
    pub(crate) fn new(rule: Rule, message: impl Into<String>, mut events: Vec<i64>) -> Self {
        events.sort_unstable();
        events.dedup();
        Violation {
            rule,
            message: message.into(),
            events,
        }
    }
}

/// `I4: outcome of attempt 1, latest assigned is Some(2): #7 TASK_SUCCEEDED …`
impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.message)
    }
}
