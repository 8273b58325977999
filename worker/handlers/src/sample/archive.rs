//! `export.archive`: packs the exported tables and a manifest into
//! `<shared_dir>/migration-<id>/export.tar.gz`.
//!
//! The manifest is computed from the files themselves (not from the outputs
//! of the `export.table` tasks), so it describes exactly what the archive
//! holds. Entries have fixed metadata (mode 0644, mtime 0, uid/gid 0) so the
//! same files always give the same archive. tar and gzip are blocking APIs,
//! so the work runs on the blocking pool.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::ndjson::digest_reader;
use super::{archive_path, migration_dir, temp_path};
use stagecoach_worker::{TaskContext, TaskError, TaskOutput};

/// Name of the manifest inside the archive.
pub(crate) const MANIFEST: &str = "manifest.json";

/// `manifest.json`: what the archive holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub(crate) migration_id: i64,
    pub(crate) subject: String,
    /// The migration parameter `source`, if it was a string.
    pub(crate) source: Option<String>,
    pub(crate) tables: Vec<ManifestTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestTable {
    pub(crate) name: String,
    /// Path inside the archive: `tables/<name>.ndjson`.
    pub(crate) file: String,
    pub(crate) rows: u64,
    pub(crate) sha256: String,
    pub(crate) bytes: u64,
}

/// Payload `{}`. Output `{"archive": path, "tables": n, "rows": total,
/// "bytes": archive size}`.
pub async fn archive(shared_dir: &Path, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let dir = migration_dir(shared_dir, ctx.migration_id());
    let path = archive_path(shared_dir, ctx.migration_id());
    let temp = temp_path(&path, &ctx);
    let manifest = Manifest {
        migration_id: ctx.migration_id(),
        subject: ctx.subject().to_string(),
        source: ctx
            .parameters()
            .get("source")
            .and_then(|s| s.as_str())
            .map(str::to_string),
        tables: Vec::new(),
    };
    let (manifest, bytes) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || build(&dir, manifest, &temp, &path))
            .await
            .map_err(|e| TaskError::retryable(format!("the archive builder crashed: {e}")))??
    };
    ctx.progress(1, 1);
    Ok(TaskOutput::new(json!({
        "archive": path.display().to_string(),
        "tables": manifest.tables.len(),
        "rows": manifest.tables.iter().map(|t| t.rows).sum::<u64>(),
        "bytes": bytes,
    })))
}

/// Writes the archive to `temp`, renames it to `path`; returns the manifest
/// and the archive's size.
fn build(
    dir: &Path,
    mut manifest: Manifest,
    temp: &Path,
    path: &Path,
) -> Result<(Manifest, u64), TaskError> {
    let io_error = |what: &str, p: &Path, e: std::io::Error| {
        TaskError::retryable(format!("cannot {what} {}: {e}", p.display()))
    };
    let files =
        table_files(&dir.join("tables")).map_err(|e| io_error("list", &dir.join("tables"), e))?;
    for (name, file) in &files {
        let digest = File::open(file)
            .and_then(digest_reader)
            .map_err(|e| io_error("read", file, e))?;
        manifest.tables.push(ManifestTable {
            name: name.clone(),
            file: format!("tables/{name}.ndjson"),
            rows: digest.rows,
            sha256: digest.sha256,
            bytes: digest.bytes,
        });
    }
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| TaskError::fatal(format!("cannot encode the manifest: {e}")))?;

    std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    let write = || -> std::io::Result<()> {
        let gz = GzEncoder::new(BufWriter::new(File::create(temp)?), Compression::default());
        let mut tar = tar::Builder::new(gz);
        append(
            &mut tar,
            MANIFEST,
            manifest_json.len() as u64,
            manifest_json.as_slice(),
        )?;
        for ((_, file), entry) in files.iter().zip(&manifest.tables) {
            append(&mut tar, &entry.file, entry.bytes, File::open(file)?)?;
        }
        let mut out = tar.into_inner()?.finish()?;
        out.flush()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(temp);
        return Err(io_error("write", temp, e));
    }
    std::fs::rename(temp, path).map_err(|e| io_error("rename into place", path, e))?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| io_error("stat", path, e))?
        .len();
    Ok((manifest, bytes))
}

/// `(table, path)` of every `<table>.ndjson` in `dir`, by table name. A
/// missing directory means a source without tables. Temporary files of
/// unfinished attempts (`.<name>…tmp`) are skipped.
fn table_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(table) = file_name.strip_suffix(".ndjson")
            && !table.is_empty()
            && !file_name.starts_with('.')
            && entry.file_type()?.is_file()
        {
            files.push((table.to_string(), entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: impl std::io::Read,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, data)
}
