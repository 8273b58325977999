//! `export.table`: one table of the source to
//! `<shared_dir>/migration-<id>/tables/<table>.ndjson`.
//!
//! The file is written under a temporary name and renamed into place, so a
//! retry (or a late duplicate attempt whose lease was lost) only ever
//! replaces a complete file with another complete file.

use std::path::Path;

use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::BufWriter;

use super::ndjson::{EncodeError, write_table};
use super::{
    count_rows, open_source, source_path, tables_dir, temp_path, usable_as_file_name, user_tables,
};
use stagecoach_worker::{TaskContext, TaskError, TaskOutput};

/// Payload `{"table": name}`. Output `{"table", "rows", "sha256", "file"}`
/// (`file` is the absolute path written). Progress is rows done of rows in
/// the table.
pub async fn export_table(shared_dir: &Path, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let table = ctx
        .payload()
        .get("table")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            TaskError::fatal("payload needs \"table\": the name of the table to export")
        })?
        .to_string();
    if !usable_as_file_name(&table) {
        return Err(TaskError::fatal(format!(
            "table {table:?} cannot be exported: its name is not usable as a file name"
        )));
    }
    let source = source_path(&ctx)?;
    let mut conn = open_source(&source).await?;
    if !user_tables(&mut conn).await?.contains(&table) {
        return Err(TaskError::fatal(format!(
            "table {table:?} does not exist in {}",
            source.display()
        )));
    }
    let total = count_rows(&mut conn, &table).await?;
    ctx.progress(0, total);

    let dir = tables_dir(shared_dir, ctx.migration_id());
    let path = dir.join(format!("{table}.ndjson"));
    let temp = temp_path(&path, &ctx);
    let io_error = |what: &str, p: &Path, e: std::io::Error| {
        TaskError::retryable(format!("cannot {what} {}: {e}", p.display()))
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io_error("create", &dir, e))?;
    let file = tokio::fs::File::create(&temp)
        .await
        .map_err(|e| io_error("create", &temp, e))?;
    let mut out = BufWriter::new(file);
    let written = write_table(&mut conn, &table, &mut out, |done| {
        ctx.progress(done, total.max(done));
        !ctx.is_cancelled()
    })
    .await;
    let _ = conn.close().await;
    let digest = match written {
        Ok(digest) => digest,
        Err(e) => {
            // Best effort: a leftover temp file is ignored by the archive.
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(match e {
                EncodeError::Canceled => TaskError::retryable("canceled"),
                EncodeError::Sql(e) => {
                    TaskError::retryable(format!("cannot read table {table:?}: {e}"))
                }
                EncodeError::Io(e) => io_error("write", &temp, e),
            });
        }
    };
    // Durable before it becomes visible under its final name.
    out.into_inner()
        .sync_all()
        .await
        .map_err(|e| io_error("sync", &temp, e))?;
    tokio::fs::rename(&temp, &path)
        .await
        .map_err(|e| io_error("rename into place", &path, e))?;
    ctx.progress(digest.rows, digest.rows);
    Ok(TaskOutput::new(json!({
        "table": table,
        "rows": digest.rows,
        "sha256": digest.sha256,
        "file": path.display().to_string(),
    })))
}
