//! The sample migration: a parallel export of a SQLite "project" database.
//!
//! It shows every feature of the scheduler on real work: a first task
//! discovers the work (one task per table, added to a dynamic stage), those
//! tasks run in parallel on any worker, and two single tasks then build and
//! verify the result. Run it with the plan from [`plan_json`] and the
//! migration parameters `{"source": "/absolute/path/to/source.db"}`;
//! [`create_source_database`] makes a source to try it on.
//!
//! Files, under the worker's shared directory (the same on every worker):
//!
//! ```text
//! <shared_dir>/migration-<id>/tables/<table>.ndjson   export.table, one per table
//! <shared_dir>/migration-<id>/export.tar.gz           export.archive:
//!     manifest.json                                    {"migration_id", "subject", "source",
//!                                                       "tables": [{"name", "file", "rows", "sha256", "bytes"}]}
//!     tables/<table>.ndjson
//! ```
//!
//! Every file is written to a temporary name in the same directory and
//! renamed into place, so a retried or concurrent attempt never leaves a
//! half-written file under the final name. Errors no retry can fix (a
//! missing parameter, a source that is not a database, a failed
//! verification) are fatal; I/O errors are retryable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, Connection};

use stagecoach_worker::{TaskContext, TaskError, WorkerBuilder};

mod archive;
mod inspect;
mod ndjson;
mod source;
mod table;
#[cfg(test)]
mod tests;
mod verify;

pub use archive::archive;
pub use inspect::inspect;
pub use source::{SampleError, SourceSummary, TableSummary, create_source_database};
pub use table::export_table;
pub use verify::verify;

/// The stage `export.inspect` adds its `export.table` tasks to.
pub const EXPORT_STAGE: &str = "export";

/// The plan of the sample migration, as accepted by `PutPlan`'s `plan_json`.
pub fn plan_json() -> Value {
    json!({
        "name": "project-export",
        "description": "Exports a SQLite project database (migration parameter \"source\"): \
                        lists its tables, exports each table to NDJSON in parallel, \
                        archives the files with a manifest, and verifies the archive against the source.",
        "stages": [
            {"name": "inspect", "tasks": [{"kind": "export.inspect"}]},
            {"name": EXPORT_STAGE, "dynamic": true},
            {"name": "archive", "tasks": [{"kind": "export.archive"}]},
            {"name": "verify", "tasks": [{"kind": "export.verify"}]},
        ]
    })
}

/// Registers `export.inspect`, `export.table`, `export.archive` and
/// `export.verify`, writing under `shared_dir`.
pub fn register(builder: WorkerBuilder, shared_dir: PathBuf) -> WorkerBuilder {
    let dir: Arc<Path> = shared_dir.into();
    let (table_dir, archive_dir, verify_dir) = (dir.clone(), dir.clone(), dir);
    builder
        .handler("export.inspect", inspect)
        .handler("export.table", move |ctx| {
            let dir = table_dir.clone();
            async move { export_table(&dir, ctx).await }
        })
        .handler("export.archive", move |ctx| {
            let dir = archive_dir.clone();
            async move { archive(&dir, ctx).await }
        })
        .handler("export.verify", move |ctx| {
            let dir = verify_dir.clone();
            async move { verify(&dir, ctx).await }
        })
}

/// `<shared_dir>/migration-<id>`.
pub fn migration_dir(shared_dir: &Path, migration_id: i64) -> PathBuf {
    shared_dir.join(format!("migration-{migration_id}"))
}

/// `<shared_dir>/migration-<id>/tables`.
pub fn tables_dir(shared_dir: &Path, migration_id: i64) -> PathBuf {
    migration_dir(shared_dir, migration_id).join("tables")
}

/// `<shared_dir>/migration-<id>/export.tar.gz`.
pub fn archive_path(shared_dir: &Path, migration_id: i64) -> PathBuf {
    migration_dir(shared_dir, migration_id).join("export.tar.gz")
}

/// A name in the same directory as `path` that only this attempt writes.
fn temp_path(path: &Path, ctx: &TaskContext) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{}.tmp", ctx.task_id(), ctx.attempt()))
}

/// The migration parameter `source`: an absolute path.
fn source_path(ctx: &TaskContext) -> Result<PathBuf, TaskError> {
    let value = ctx.parameters().get("source").ok_or_else(|| {
        TaskError::fatal(
            "migration parameter \"source\" is missing: set it to the absolute path of the SQLite database to export",
        )
    })?;
    let path = value.as_str().map(PathBuf::from).ok_or_else(|| {
        TaskError::fatal(format!(
            "migration parameter \"source\" must be a path string, got {value}"
        ))
    })?;
    if !path.is_absolute() {
        return Err(TaskError::fatal(format!(
            "migration parameter \"source\" must be an absolute path, got {:?}",
            path.display()
        )));
    }
    Ok(path)
}

/// Opens the source read-only; the export never writes to it.
async fn open_source(path: &Path) -> Result<SqliteConnection, TaskError> {
    let cannot_open = |e: sqlx::Error| {
        TaskError::fatal(format!(
            "cannot open migration parameter \"source\" ({}) as a SQLite database: {e}",
            path.display()
        ))
    };
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(cannot_open)?;
    // A file that is not a database opens fine and fails on the first read.
    sqlx::query("SELECT count(*) FROM sqlite_master")
        .execute(&mut conn)
        .await
        .map_err(cannot_open)?;
    Ok(conn)
}

/// The user tables of the source, by name (SQLite's own `sqlite_*` tables
/// excluded).
async fn user_tables(conn: &mut SqliteConnection) -> Result<Vec<String>, TaskError> {
    // `_` is a LIKE wildcard; escape it so only the real prefix matches.
    sqlx::query_scalar(
        r"SELECT name FROM sqlite_master
          WHERE type = 'table' AND name NOT LIKE 'sqlite\_%' ESCAPE '\'
          ORDER BY name",
    )
    .fetch_all(conn)
    .await
    .map_err(|e| TaskError::retryable(format!("cannot list the source's tables: {e}")))
}

async fn count_rows(conn: &mut SqliteConnection, table: &str) -> Result<u64, TaskError> {
    let sql = format!("SELECT count(*) FROM {}", ndjson::quote_ident(table));
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(conn)
        .await
        .map_err(|e| {
            TaskError::retryable(format!("cannot count the rows of table {table:?}: {e}"))
        })?;
    Ok(count.max(0) as u64)
}

/// Whether a table name can be used as `<table>.ndjson` without escaping
/// the tables directory.
fn usable_as_file_name(table: &str) -> bool {
    !table.is_empty() && !table.starts_with('.') && !table.contains(['/', '\\', '\0'])
}
