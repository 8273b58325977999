//! The one NDJSON encoding of a table, shared by `export.table` (which writes
//! it to a file) and `export.verify` (which re-encodes the source in memory
//! and compares digests): if the two ever disagreed, every verification
//! would fail, so there is exactly one encoder.
//!
//! Each row, in rowid order, is one line: a JSON object of column name to
//! value, columns in table order. Integers stay integers, reals are JSON
//! numbers (non-finite ones the strings `inf`, `-inf`, `NaN`), text is a
//! string (invalid UTF-8 replaced), blobs are lowercase hex strings, NULL is
//! `null`.

use std::io::{self, Read};

use futures::TryStreamExt;
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// How often (in rows) the row callback runs.
const CALLBACK_EVERY: u64 = 100;

/// The size, line count and SHA-256 of an NDJSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableDigest {
    pub(crate) rows: u64,
    pub(crate) bytes: u64,
    /// Lowercase hex.
    pub(crate) sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error("reading the table: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("writing the export: {0}")]
    Io(#[from] io::Error),
    #[error("canceled")]
    Canceled,
}

/// Quotes an identifier for SQLite.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Encodes one row as a JSON object, without the newline.
pub(crate) fn encode_row(row: &SqliteRow) -> Result<String, sqlx::Error> {
    let mut line = String::from("{");
    for (i, column) in row.columns().iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&Value::String(column.name().to_string()).to_string());
        line.push(':');
        line.push_str(&encode_value(row, i)?.to_string());
    }
    line.push('}');
    Ok(line)
}

fn encode_value(row: &SqliteRow, i: usize) -> Result<Value, sqlx::Error> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    // SQLite is dynamically typed: the storage class of this value, not the
    // column's declared type, decides the encoding.
    let class = raw.type_info().name().to_string();
    Ok(match class.as_str() {
        "INTEGER" => Value::from(row.try_get_unchecked::<i64, _>(i)?),
        "REAL" => {
            let f = row.try_get_unchecked::<f64, _>(i)?;
            Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
        }
        "BLOB" => Value::String(hex::encode(row.try_get_unchecked::<Vec<u8>, _>(i)?)),
        // TEXT: read the bytes so a value that is not UTF-8 still encodes.
        _ => {
            let bytes = row.try_get_unchecked::<Vec<u8>, _>(i)?;
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }
    })
}

/// Streams every row of `table`, in rowid order, to `out` as NDJSON and
/// returns the digest of what was written. `on_rows(done)` runs every few
/// rows and at the end; returning false stops with [`EncodeError::Canceled`].
pub(crate) async fn write_table<W: AsyncWrite + Unpin>(
    conn: &mut SqliteConnection,
    table: &str,
    out: &mut W,
    mut on_rows: impl FnMut(u64) -> bool,
) -> Result<TableDigest, EncodeError> {
    // The identifier is quoted (and the callers only pass names read from
    // sqlite_master), so the dynamic SQL cannot inject anything.
    let sql = format!("SELECT * FROM {} ORDER BY rowid", quote_ident(table));
    let mut rows = sqlx::query(AssertSqlSafe(sql)).fetch(&mut *conn);
    let mut hasher = Sha256::new();
    let mut digest = TableDigest {
        rows: 0,
        bytes: 0,
        sha256: String::new(),
    };
    while let Some(row) = rows.try_next().await? {
        let mut line = encode_row(&row)?;
        line.push('\n');
        hasher.update(line.as_bytes());
        out.write_all(line.as_bytes()).await?;
        digest.rows += 1;
        digest.bytes += line.len() as u64;
        if digest.rows.is_multiple_of(CALLBACK_EVERY) && !on_rows(digest.rows) {
            return Err(EncodeError::Canceled);
        }
    }
    if !on_rows(digest.rows) {
        return Err(EncodeError::Canceled);
    }
    out.flush().await?;
    digest.sha256 = hex::encode(hasher.finalize());
    Ok(digest)
}

/// The digest of an NDJSON document read from `reader` (rows = newlines).
pub(crate) fn digest_reader(mut reader: impl Read) -> io::Result<TableDigest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut rows, mut bytes) = (0u64, 0u64);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += n as u64;
    }
    Ok(TableDigest {
        rows,
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}
