//! The oracle for the sample export: opens an `export.tar.gz` and checks it
//! against the source database it was made from.
//!
//! Expected contents: `manifest.json` =
//! `{"migration_id","subject","source","tables":[{"name","file","rows","sha256","bytes"}]}`
//! and `tables/<table>.ndjson`, one JSON object per row in rowid order,
//! column name → value. The source is read here with plain SQL, independent
//! of the worker's exporter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use flate2::read::GzDecoder;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{Connection, Row, SqliteConnection, TypeInfo, ValueRef};

/// What a good archive held.
#[derive(Debug, Clone)]
pub struct ArchiveSummary {
    /// The parsed manifest.
    pub manifest: Json,
    /// Rows exported per table.
    pub rows: BTreeMap<String, usize>,
}

/// Reads every file of a `.tar.gz` into memory, by normalized path.
pub fn read_archive(path: &Path) -> Result<HashMap<String, Vec<u8>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut archive = tar::Archive::new(GzDecoder::new(file));
    let mut files = HashMap::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("read {}: {e}", path.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| format!("entry path: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| format!("read entry {name}: {e}"))?;
        files.insert(name, bytes);
    }
    Ok(files)
}

/// Every user table of a SQLite database with its rows, in rowid order, as
/// JSON objects (INTEGER → integer, REAL → float, TEXT → string, NULL → null).
pub async fn read_source_tables(
    source: &Path,
) -> Result<BTreeMap<String, Vec<Map<String, Json>>>, sqlx::Error> {
    let opts = SqliteConnectOptions::from_str("sqlite://")?
        .filename(source)
        .read_only(true);
    let mut conn = SqliteConnection::connect_with(&opts).await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await?;
    let mut tables = BTreeMap::new();
    for name in names {
        let sql = format!(
            "SELECT * FROM \"{}\" ORDER BY rowid",
            name.replace('"', "\"\"")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await?;
        let rows = rows.iter().map(row_to_json).collect::<Result<_, _>>()?;
        tables.insert(name, rows);
    }
    conn.close().await?;
    Ok(tables)
}

fn row_to_json(row: &SqliteRow) -> Result<Map<String, Json>, sqlx::Error> {
    let mut obj = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        let value = if raw.is_null() {
            Json::Null
        } else {
            match raw.type_info().name() {
                "INTEGER" => Json::from(row.try_get::<i64, _>(i)?),
                "REAL" => Json::from(row.try_get::<f64, _>(i)?),
                "TEXT" => Json::from(row.try_get::<String, _>(i)?),
                other => {
                    return Err(sqlx::Error::Protocol(format!(
                        "the oracle does not handle {other} values (column {})",
                        sqlx::Column::name(col)
                    )));
                }
            }
        };
        obj.insert(sqlx::Column::name(col).to_string(), value);
    }
    Ok(obj)
}

/// Checks the archive of the sample export of `migration_id` for `subject`
/// against `source`: the manifest's fields, one file per source table whose
/// rows, byte count and sha256 the manifest states correctly, and rows equal
/// to the source's, in order. Returns every problem found.
pub async fn check_archive(
    archive: &Path,
    source: &Path,
    migration_id: i64,
    subject: &str,
) -> Result<ArchiveSummary, Vec<String>> {
    let files = read_archive(archive).map_err(|e| vec![e])?;
    let tables = read_source_tables(source)
        .await
        .map_err(|e| vec![format!("read source {}: {e}", source.display())])?;
    let mut errors = Vec::new();
    let manifest: Json = match files
        .get("manifest.json")
        .map(|b| serde_json::from_slice(b))
    {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Err(vec![format!("manifest.json is not JSON: {e}")]),
        None => {
            let names: BTreeSet<_> = files.keys().collect();
            return Err(vec![format!(
                "no manifest.json in the archive; files: {names:?}"
            )]);
        }
    };
    let id_ok = manifest["migration_id"].as_i64() == Some(migration_id)
        || manifest["migration_id"].as_str() == Some(migration_id.to_string().as_str());
    if !id_ok {
        errors.push(format!(
            "manifest migration_id {}, wanted {migration_id}",
            manifest["migration_id"]
        ));
    }
    if manifest["subject"].as_str() != Some(subject) {
        errors.push(format!(
            "manifest subject {}, wanted {subject:?}",
            manifest["subject"]
        ));
    }
    if manifest["source"].as_str() != Some(&*source.to_string_lossy()) {
        errors.push(format!(
            "manifest source {}, wanted {:?}",
            manifest["source"], source
        ));
    }
    let Some(entries) = manifest["tables"].as_array() else {
        errors.push(format!(
            "manifest tables is not an array: {}",
            manifest["tables"]
        ));
        return Err(errors);
    };

    let mut rows = BTreeMap::new();
    for entry in entries {
        let name = entry["name"].as_str().unwrap_or_default().to_string();
        let Some(source_rows) = tables.get(&name) else {
            errors.push(format!("manifest lists table {name:?}, not in the source"));
            continue;
        };
        match check_table(entry, &name, &files, source_rows) {
            Ok(()) => {
                rows.insert(name, source_rows.len());
            }
            Err(e) => errors.extend(e),
        }
    }
    let listed: BTreeSet<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
    for name in tables.keys() {
        if !listed.contains(name.as_str()) {
            errors.push(format!(
                "source table {name:?} is missing from the manifest"
            ));
        }
    }
    if listed.len() != entries.len() {
        errors.push(format!("manifest lists a table twice: {entries:?}"));
    }
    if errors.is_empty() {
        Ok(ArchiveSummary { manifest, rows })
    } else {
        Err(errors)
    }
}

/// One manifest entry against its file and its source rows.
fn check_table(
    entry: &Json,
    name: &str,
    files: &HashMap<String, Vec<u8>>,
    source_rows: &[Map<String, Json>],
) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let file = entry["file"].as_str().unwrap_or_default();
    let want_file = format!("tables/{name}.ndjson");
    if file.trim_start_matches("./") != want_file {
        errors.push(format!(
            "table {name}: manifest file {file:?}, wanted {want_file:?}"
        ));
    }
    let Some(bytes) = files.get(file.trim_start_matches("./")) else {
        errors.push(format!("table {name}: file {file:?} is not in the archive"));
        return Err(errors);
    };
    let sha = hex::encode(Sha256::digest(bytes));
    if !entry["sha256"]
        .as_str()
        .is_some_and(|s| s.eq_ignore_ascii_case(&sha))
    {
        errors.push(format!(
            "table {name}: manifest sha256 {}, file has {sha}",
            entry["sha256"]
        ));
    }
    if entry["bytes"].as_u64() != Some(bytes.len() as u64) {
        errors.push(format!(
            "table {name}: manifest bytes {}, file has {}",
            entry["bytes"],
            bytes.len()
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("table {name}: file is not UTF-8: {e}"));
            return Err(errors);
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if entry["rows"].as_u64() != Some(lines.len() as u64) {
        errors.push(format!(
            "table {name}: manifest rows {}, file has {} lines",
            entry["rows"],
            lines.len()
        ));
    }
    if lines.len() != source_rows.len() {
        errors.push(format!(
            "table {name}: {} rows exported, source has {}",
            lines.len(),
            source_rows.len()
        ));
    }
    for (i, (line, want)) in lines.iter().zip(source_rows).enumerate() {
        let got: Json = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!(
                    "table {name}: line {} is not JSON ({e}): {line}",
                    i + 1
                ));
                break;
            }
        };
        let want = Json::Object(want.clone());
        if !json_eq(&got, &want) {
            errors.push(format!(
                "table {name}: row {} is {got}, source has {want}",
                i + 1
            ));
            break;
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// JSON equality where numbers compare by value: `2` equals `2.0` (an
/// exporter may print a REAL without its fraction), but integers compare
/// exactly, so a large integer that went through a float does not pass.
pub fn json_eq(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            // Past 2^53 a float cannot stand for the integer it rounds to.
            (Some(i), None) | (None, Some(i)) if i.unsigned_abs() > 1 << 53 => false,
            _ => x.as_f64() == y.as_f64(),
        },
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests;
