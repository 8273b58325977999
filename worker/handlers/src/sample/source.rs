//! A deterministic sample source database for the project export: users,
//! projects, labels, issues, merge requests and comments, with foreign keys
//! between them and every SQLite storage class represented (integers, reals,
//! text with quotes, newlines and non-ASCII, blobs, NULLs).
//!
//! Content is a pure function of the row number and the scale, so two
//! databases created with the same scale are identical and tests can assert
//! on exact row counts.

use std::io;
use std::path::{Path, PathBuf};

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};

/// Why the sample database could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// `scale` was 0.
    #[error("scale must be at least 1")]
    ZeroScale,
    /// An existing file at the path could not be replaced.
    #[error("cannot replace {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// SQLite refused to create or fill the database.
    #[error("cannot write the sample database {path}: {source}")]
    Sql { path: PathBuf, source: sqlx::Error },
}

/// What [`create_source_database`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSummary {
    /// The database file.
    pub path: PathBuf,
    /// Every table with its row count, in creation order.
    pub tables: Vec<TableSummary>,
}

impl SourceSummary {
    /// Rows across every table.
    pub fn total_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// One table of the sample database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSummary {
    pub name: String,
    pub rows: u64,
}

const SCHEMA: &str = r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    email TEXT,
    admin INTEGER NOT NULL,
    avatar BLOB,
    created_at TEXT NOT NULL
);
CREATE TABLE projects (
    id INTEGER PRIMARY KEY,
    owner_id INTEGER NOT NULL REFERENCES users(id),
    path TEXT NOT NULL UNIQUE,
    description TEXT,
    visibility TEXT NOT NULL,
    star_count INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    title TEXT NOT NULL,
    color TEXT NOT NULL
);
CREATE TABLE issues (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    iid INTEGER NOT NULL,
    author_id INTEGER NOT NULL REFERENCES users(id),
    label_id INTEGER REFERENCES labels(id),
    title TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    weight REAL,
    created_at TEXT NOT NULL,
    closed_at TEXT
);
CREATE TABLE merge_requests (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    iid INTEGER NOT NULL,
    author_id INTEGER NOT NULL REFERENCES users(id),
    title TEXT NOT NULL,
    source_branch TEXT NOT NULL,
    target_branch TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    merged_at TEXT
);
CREATE TABLE comments (
    id INTEGER PRIMARY KEY,
    author_id INTEGER NOT NULL REFERENCES users(id),
    issue_id INTEGER REFERENCES issues(id),
    merge_request_id INTEGER REFERENCES merge_requests(id),
    body TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"#;

/// Rows per table at scale 1 (4,500 in all); every count scales linearly.
const USERS: u64 = 200;
const PROJECTS: u64 = 100;
const LABELS_PER_PROJECT: u64 = 3;
const ISSUES: u64 = 1000;
const MERGE_REQUESTS: u64 = 400;
const COMMENTS: u64 = 2500;

/// Creates (or replaces) a SQLite database at `path` with the sample
/// project data, `scale` times the base size, in one transaction.
pub async fn create_source_database(path: &Path, scale: u32) -> Result<SourceSummary, SampleError> {
    if scale == 0 {
        return Err(SampleError::ZeroScale);
    }
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(SampleError::Io {
                    path: file,
                    source: e,
                });
            }
            _ => {}
        }
    }
    let sql_error = |source| SampleError::Sql {
        path: path.to_path_buf(),
        source,
    };
    // A rollback journal, not WAL: exporters open the file read-only, which
    // WAL complicates (it needs the -shm file or a writable directory).
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Delete);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(sql_error)?;
    let tables = fill(&mut conn, u64::from(scale)).await.map_err(sql_error)?;
    conn.close().await.map_err(sql_error)?;
    Ok(SourceSummary {
        path: path.to_path_buf(),
        tables,
    })
}

async fn fill(conn: &mut SqliteConnection, scale: u64) -> Result<Vec<TableSummary>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;

    let users = USERS * scale;
    for i in 1..=users {
        sqlx::query("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(i as i64)
            .bind(format!("user{i}"))
            .bind(NAMES[(i % NAMES.len() as u64) as usize])
            .bind((i % 7 != 0).then(|| format!("user{i}@example.com")))
            .bind((i % 50 == 1) as i64)
            .bind((i % 3 == 0).then(|| avatar(i)))
            .bind(timestamp(i * 37))
            .execute(&mut *tx)
            .await?;
    }

    let projects = PROJECTS * scale;
    for i in 1..=projects {
        let owner = pick(i, users, 1);
        sqlx::query("INSERT INTO projects VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(i as i64)
            .bind(owner as i64)
            .bind(format!("user{owner}/project-{i}"))
            .bind(
                (i % 4 != 0)
                    .then(|| format!("Project {i}: a \"sample\" repository\nwith two lines")),
            )
            .bind(["public", "internal", "private"][(i % 3) as usize])
            .bind(pick(i, 5000, 2) as i64)
            .bind(timestamp(users * 37 + i * 101))
            .execute(&mut *tx)
            .await?;
    }

    let labels = projects * LABELS_PER_PROJECT;
    for i in 1..=labels {
        sqlx::query("INSERT INTO labels VALUES (?, ?, ?, ?)")
            .bind(i as i64)
            .bind(((i - 1) / LABELS_PER_PROJECT + 1) as i64)
            .bind(["bug", "feature", "documentation"][(i % LABELS_PER_PROJECT) as usize])
            .bind(format!("#{:06x}", pick(i, 0xff_ffff, 3)))
            .execute(&mut *tx)
            .await?;
    }

    let issues = ISSUES * scale;
    let mut next_iid = vec![0i64; projects as usize + 1];
    for i in 1..=issues {
        let project = pick(i, projects, 4);
        next_iid[project as usize] += 1;
        let closed = i % 3 == 0;
        let label = (i % 5 != 0)
            .then(|| ((project - 1) * LABELS_PER_PROJECT + i % LABELS_PER_PROJECT + 1) as i64);
        sqlx::query("INSERT INTO issues VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(i as i64)
            .bind(project as i64)
            .bind(next_iid[project as usize])
            .bind(pick(i, users, 5) as i64)
            .bind(label)
            .bind(format!(
                "Issue {i}: {}",
                TOPICS[(i % TOPICS.len() as u64) as usize]
            ))
            .bind((i % 6 != 0).then(|| {
                format!(
                    "Steps to reproduce #{i}:\n1. open the page\n2. see «{}»",
                    i * 3
                )
            }))
            .bind(if closed { "closed" } else { "opened" })
            .bind((i % 4 != 0).then_some((i % 13) as f64 * 0.5))
            .bind(timestamp(50_000 + i * 11))
            .bind(closed.then(|| timestamp(60_000 + i * 13)))
            .execute(&mut *tx)
            .await?;
    }

    let merge_requests = MERGE_REQUESTS * scale;
    for i in 1..=merge_requests {
        let state = ["merged", "opened", "closed", "merged"][(i % 4) as usize];
        sqlx::query("INSERT INTO merge_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(i as i64)
            .bind(pick(i, projects, 6) as i64)
            .bind(i as i64)
            .bind(pick(i, users, 7) as i64)
            .bind(format!(
                "Resolve \"{}\"",
                TOPICS[(i % TOPICS.len() as u64) as usize]
            ))
            .bind(format!("feature/{i}-fix"))
            .bind("main")
            .bind(state)
            .bind(timestamp(70_000 + i * 17))
            .bind((state == "merged").then(|| timestamp(80_000 + i * 19)))
            .execute(&mut *tx)
            .await?;
    }

    let comments = COMMENTS * scale;
    for i in 1..=comments {
        let on_issue = i % 3 != 0;
        sqlx::query("INSERT INTO comments VALUES (?, ?, ?, ?, ?, ?)")
            .bind(i as i64)
            .bind(pick(i, users, 8) as i64)
            .bind(on_issue.then(|| pick(i, issues, 9) as i64))
            .bind((!on_issue).then(|| pick(i, merge_requests, 10) as i64))
            .bind(format!(
                "{} (comment {i}) — ünïcödé, \"quotes\", tab\there",
                REPLIES[(i % REPLIES.len() as u64) as usize]
            ))
            .bind(timestamp(90_000 + i * 7))
            .execute(&mut *tx)
            .await?;
    }

    tx.commit().await?;
    Ok([
        ("users", users),
        ("projects", projects),
        ("labels", labels),
        ("issues", issues),
        ("merge_requests", merge_requests),
        ("comments", comments),
    ]
    .into_iter()
    .map(|(name, rows)| TableSummary {
        name: name.to_string(),
        rows,
    })
    .collect())
}

const NAMES: [&str; 6] = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Ken Thompson",
];
const TOPICS: [&str; 5] = [
    "login fails",
    "slow pipeline",
    "typo in docs",
    "crash on upload",
    "add dark mode",
];
const REPLIES: [&str; 4] = [
    "LGTM",
    "Can you add a test?",
    "Reproduced on main",
    "Fixed in the latest build",
];

/// A deterministic spread of `i` over `1..=n`.
fn pick(i: u64, n: u64, salt: u64) -> u64 {
    (i.wrapping_mul(2_654_435_761)
        .wrapping_add(salt.wrapping_mul(40_503)))
        % n
        + 1
}

/// A few bytes that are not valid UTF-8, so blobs are exercised for real.
fn avatar(i: u64) -> Vec<u8> {
    (0..8)
        .map(|k| ((i * 31 + k * 7) % 256) as u8 | 0x80)
        .collect()
}

/// An ISO-8601 instant in 2024, `minutes` after the start of the year
/// (months of 28 days keep it valid without a calendar).
fn timestamp(minutes: u64) -> String {
    let (hours, minute) = (minutes / 60, minutes % 60);
    let (days, hour) = (hours / 24, hours % 24);
    let (month, day) = ((days / 28) % 12 + 1, days % 28 + 1);
    format!("2024-{month:02}-{day:02}T{hour:02}:{minute:02}:00Z")
}
