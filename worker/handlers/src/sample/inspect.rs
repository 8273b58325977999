//! `export.inspect`: discovers the work. Lists the source's user tables and
//! adds one `export.table` task per table to the dynamic `export` stage, so
//! the plan never needs to know the schema.

use serde_json::json;
use sqlx::Connection;

use super::{EXPORT_STAGE, open_source, source_path, usable_as_file_name, user_tables};
use stagecoach_worker::{TaskContext, TaskError, TaskOutput};

/// Payload `{}`. Output `{"tables": [name, …]}`; adds
/// `export.table {"table": name}` to stage `export` for each table.
pub async fn inspect(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let source = source_path(&ctx)?;
    let mut conn = open_source(&source).await?;
    let tables = user_tables(&mut conn).await?;
    if let Some(bad) = tables.iter().find(|t| !usable_as_file_name(t)) {
        return Err(TaskError::fatal(format!(
            "table {bad:?} cannot be exported: its name is not usable as a file name"
        )));
    }
    // Closing is best effort; the connection was read-only.
    let _ = conn.close().await;
    ctx.progress(1, 1);
    let mut output = TaskOutput::new(json!({ "tables": tables }));
    for table in &tables {
        output = output.add_task(EXPORT_STAGE, "export.table", json!({ "table": table }));
    }
    Ok(output)
}
