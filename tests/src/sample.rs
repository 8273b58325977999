//! The sample project export, as a client and a test oracle see it: its plan
//! (written here from the documented contract, not copied from the worker)
//! and a source SQLite database to export.
//!
//! The database is written with sqlx in this crate so the oracle does not
//! share code with the worker that exports it. Its rows exercise what an
//! exporter tends to get wrong: NULLs, REALs, integers above 2^53, quotes,
//! newlines and non-ASCII text, an empty table, a table without an integer
//! primary key.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Value as Json, json};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

/// Name of the sample plan.
pub const SAMPLE_PLAN: &str = "project-export";

/// The sample plan as a `plan_json` document: `inspect` adds one
/// `export.table` task per source table to the dynamic `export` stage, then
/// `archive` and `verify` run.
pub fn sample_plan_json() -> Json {
    json!({
        "name": SAMPLE_PLAN,
        "description": "Export a project's SQLite database to a verified tar.gz archive",
        "stages": [
            {"name": "inspect", "tasks": [{"kind": "export.inspect"}]},
            {"name": "export", "dynamic": true},
            {"name": "archive", "tasks": [{"kind": "export.archive"}]},
            {"name": "verify", "tasks": [{"kind": "export.verify"}]}
        ]
    })
}

/// A source database written by [`build_source_db`].
#[derive(Debug, Clone)]
pub struct SourceDb {
    /// Absolute path of the SQLite file.
    pub path: PathBuf,
    /// Its tables with their row counts, by name.
    pub tables: Vec<(String, usize)>,
}

impl SourceDb {
    /// The migration parameters that export it: `{"source": PATH}`.
    pub fn parameters(&self) -> Json {
        json!({ "source": self.path.to_string_lossy() })
    }
}

/// Rows per table.
const USERS: i64 = 250;
const PROJECTS: i64 = 120;
const ISSUES: i64 = 2_000;

/// Writes the sample source database at `path` (which must not exist).
pub async fn build_source_db(path: &Path) -> Result<SourceDb, sqlx::Error> {
    let path = std::path::absolute(path)?;
    let opts = SqliteConnectOptions::from_str("sqlite://")?
        .filename(&path)
        .create_if_missing(true);
    let mut conn = SqliteConnection::connect_with(&opts).await?;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(
        "CREATE TABLE users (
             id INTEGER PRIMARY KEY,
             login TEXT NOT NULL,
             name TEXT,
             email TEXT,
             karma REAL,
             admin INTEGER NOT NULL
         );
         CREATE TABLE projects (
             id INTEGER PRIMARY KEY,
             owner_id INTEGER NOT NULL REFERENCES users(id),
             path TEXT NOT NULL,
             description TEXT,
             counter INTEGER NOT NULL
         );
         CREATE TABLE issues (
             id INTEGER PRIMARY KEY,
             project_id INTEGER NOT NULL REFERENCES projects(id),
             iid INTEGER NOT NULL,
             title TEXT NOT NULL,
             weight INTEGER
         );
         -- No integer primary key: rows are ordered by the hidden rowid.
         CREATE TABLE labels (title TEXT NOT NULL, color TEXT NOT NULL);
         -- Stays empty: its export is a file of zero rows.
         CREATE TABLE archived_pipelines (id INTEGER PRIMARY KEY, status TEXT);",
    )
    .execute(&mut *tx)
    .await?;

    for i in 1..=USERS {
        let name = match i % 5 {
            0 => format!("Zoë \"Z\" O'Hara {i}"),
            1 => format!("line one\nline two {i}"),
            2 => format!("Łukasz 🚂 {i}"),
            3 => format!("back\\slash\ttab {i}"),
            _ => format!("Plain Name {i}"),
        };
        let email = (i % 7 != 0).then(|| format!("user{i}@example.com"));
        sqlx::query(
            "INSERT INTO users (id, login, name, email, karma, admin) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(i)
        .bind(format!("user-{i}"))
        .bind(name)
        .bind(email)
        // Quarters are exact in binary, so text round trips compare equal.
        .bind(i as f64 * 0.25 - 10.0)
        .bind(i64::from(i % 10 == 0))
        .execute(&mut *tx)
        .await?;
    }
    for i in 1..=PROJECTS {
        let description =
            (i % 3 != 0).then(|| format!("Project {i}: {{\"json\": [1, 2]}} <b>x</b>"));
        sqlx::query(
            "INSERT INTO projects (id, owner_id, path, description, counter) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(i)
        .bind(1 + i % USERS)
        .bind(format!("group-{}/project-{i}", i % 9))
        .bind(description)
        // Above 2^53: an exporter going through f64 would change these.
        .bind((1_i64 << 53) + i)
        .execute(&mut *tx)
        .await?;
    }
    for i in 1..=ISSUES {
        let weight = (i % 4 != 0).then_some(i % 13 - 6);
        sqlx::query(
            "INSERT INTO issues (id, project_id, iid, title, weight) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(i)
        .bind(1 + i % PROJECTS)
        .bind(1 + i / PROJECTS)
        .bind(format!("Issue {i} — fix the thing"))
        .bind(weight)
        .execute(&mut *tx)
        .await?;
    }
    for (title, color) in [
        ("bug", "#ff0000"),
        ("feature", "#00ff00"),
        ("docs", "#0000ff"),
    ] {
        sqlx::query("INSERT INTO labels (title, color) VALUES (?, ?)")
            .bind(title)
            .bind(color)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    conn.close().await?;

    Ok(SourceDb {
        path,
        tables: vec![
            ("archived_pipelines".into(), 0),
            ("issues".into(), ISSUES as usize),
            ("labels".into(), 3),
            ("projects".into(), PROJECTS as usize),
            ("users".into(), USERS as usize),
        ],
    })
}
