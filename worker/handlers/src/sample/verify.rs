//! `export.verify`: proves the archive is a faithful copy of the source.
//!
//! Three checks, each failing fatally with the table and what differs:
//! the archive's files match the manifest (digest and row count, nothing
//! missing or extra); the manifest lists exactly the source's user tables;
//! and each table, re-encoded from the source in memory with the same
//! encoder as `export.table`, has the digest the archive holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;
use serde_json::json;
use sqlx::Connection;

use super::archive::{MANIFEST, Manifest};
use super::ndjson::{EncodeError, TableDigest, digest_reader, write_table};
use super::{archive_path, open_source, source_path, user_tables};
use stagecoach_worker::{TaskContext, TaskError, TaskOutput};

/// Payload `{}`. Output `{"verified_tables": n, "rows": total}`.
pub async fn verify(shared_dir: &Path, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let path = archive_path(shared_dir, ctx.migration_id());
    let (manifest, files) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || read_archive(&path))
            .await
            .map_err(|e| TaskError::retryable(format!("the archive reader crashed: {e}")))??
    };
    check_files(&manifest, &files)?;
    if manifest.migration_id != ctx.migration_id() {
        return Err(TaskError::fatal(format!(
            "the manifest is for migration {}, not {}",
            manifest.migration_id,
            ctx.migration_id()
        )));
    }

    let source = source_path(&ctx)?;
    let mut conn = open_source(&source).await?;
    let in_source: BTreeSet<String> = user_tables(&mut conn).await?.into_iter().collect();
    let in_manifest: BTreeSet<String> = manifest.tables.iter().map(|t| t.name.clone()).collect();
    if let Some(table) = in_source.difference(&in_manifest).next() {
        return Err(TaskError::fatal(format!(
            "table {table:?}: in the source but missing from the archive's manifest"
        )));
    }
    if let Some(table) = in_manifest.difference(&in_source).next() {
        return Err(TaskError::fatal(format!(
            "table {table:?}: in the archive's manifest but not in the source"
        )));
    }

    let total = manifest.tables.len() as u64;
    let mut rows = 0;
    for (done, entry) in manifest.tables.iter().enumerate() {
        ctx.progress(done as u64, total);
        let fresh = write_table(&mut conn, &entry.name, &mut tokio::io::sink(), |_| {
            !ctx.is_cancelled()
        })
        .await
        .map_err(|e| match e {
            EncodeError::Canceled => TaskError::retryable("canceled"),
            e => TaskError::retryable(format!(
                "cannot re-export table {:?} from the source: {e}",
                entry.name
            )),
        })?;
        if fresh.sha256 != entry.sha256 || fresh.rows != entry.rows {
            return Err(TaskError::fatal(format!(
                "table {:?}: the source re-exports to {} rows with sha256 {}, the archive has {} rows with sha256 {}",
                entry.name, fresh.rows, fresh.sha256, entry.rows, entry.sha256
            )));
        }
        rows += entry.rows;
    }
    let _ = conn.close().await;
    ctx.progress(total, total);
    Ok(TaskOutput::new(
        json!({ "verified_tables": total, "rows": rows }),
    ))
}

/// The manifest and the digest of every other entry, by path.
fn read_archive(path: &Path) -> Result<(Manifest, BTreeMap<String, TableDigest>), TaskError> {
    let file = File::open(path).map_err(|e| {
        TaskError::fatal(format!(
            "cannot open the archive {}: {e} (did the archive stage run?)",
            path.display()
        ))
    })?;
    let corrupt = |e: std::io::Error| {
        TaskError::fatal(format!("the archive {} is unreadable: {e}", path.display()))
    };
    let mut archive = tar::Archive::new(GzDecoder::new(file));
    let mut manifest = None;
    let mut files = BTreeMap::new();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let name = entry
            .path()
            .map_err(corrupt)?
            .to_string_lossy()
            .into_owned();
        if name == MANIFEST {
            let mut json = Vec::new();
            entry.read_to_end(&mut json).map_err(corrupt)?;
            manifest = Some(serde_json::from_slice::<Manifest>(&json).map_err(|e| {
                TaskError::fatal(format!("the archive's {MANIFEST} is invalid: {e}"))
            })?);
        } else {
            files.insert(name, digest_reader(&mut entry).map_err(corrupt)?);
        }
    }
    let manifest =
        manifest.ok_or_else(|| TaskError::fatal(format!("the archive has no {MANIFEST}")))?;
    Ok((manifest, files))
}

/// The archive holds exactly the files the manifest lists, as listed.
fn check_files(
    manifest: &Manifest,
    files: &BTreeMap<String, TableDigest>,
) -> Result<(), TaskError> {
    for table in &manifest.tables {
        let Some(file) = files.get(&table.file) else {
            return Err(TaskError::fatal(format!(
                "table {:?}: {} is listed in the manifest but missing from the archive",
                table.name, table.file
            )));
        };
        if file.sha256 != table.sha256 {
            return Err(TaskError::fatal(format!(
                "table {:?}: {} has sha256 {}, the manifest says {}",
                table.name, table.file, file.sha256, table.sha256
            )));
        }
        if file.rows != table.rows {
            return Err(TaskError::fatal(format!(
                "table {:?}: {} has {} rows, the manifest says {}",
                table.name, table.file, file.rows, table.rows
            )));
        }
    }
    let listed: BTreeSet<&str> = manifest.tables.iter().map(|t| t.file.as_str()).collect();
    if let Some(extra) = files.keys().find(|f| !listed.contains(f.as_str())) {
        return Err(TaskError::fatal(format!(
            "the archive holds {extra}, which its manifest does not list"
        )));
    }
    Ok(())
}
