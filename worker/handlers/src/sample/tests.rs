//! The sample export end to end, in process: the handlers are called directly
//! with test contexts, in the order the plan runs them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::ndjson::write_table;
use super::*;
use stagecoach_worker::{TaskContext, TaskError, TaskOutput};

const MIGRATION: i64 = 42;

fn ctx(kind: &str, payload: Value, source: &Path) -> TaskContext {
    TaskContext::for_test(
        kind,
        MIGRATION,
        payload,
        json!({ "source": source.to_str().unwrap() }),
    )
}

async fn ndjson_of(sql: &str, table: &str) -> String {
    let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    let digest = write_table(&mut conn, table, &mut out, |_| true)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(digest.bytes, text.len() as u64);
    assert_eq!(digest.rows, text.lines().count() as u64);
    text
}

#[tokio::test]
async fn the_encoder_writes_one_json_object_per_row_in_rowid_order() {
    let text = ndjson_of(
        r#"CREATE TABLE "odd ""name""" (id INTEGER PRIMARY KEY, n INTEGER, r REAL, t TEXT, b BLOB, x);
           INSERT INTO "odd ""name""" VALUES (2, -7, 0.25, 'say "hi"' || char(10) || 'ünï', x'00ff10', NULL);
           INSERT INTO "odd ""name""" VALUES (1, 9007199254740993, 1e300, '', x'', 3.0);
           INSERT INTO "odd ""name""" VALUES (3, NULL, NULL, NULL, NULL, 'text in an untyped column');"#,
        "odd \"name\"",
    )
    .await;
    let expected = [
        r#"{"id":1,"n":9007199254740993,"r":1e+300,"t":"","b":"","x":3.0}"#,
        r#"{"id":2,"n":-7,"r":0.25,"t":"say \"hi\"\nünï","b":"00ff10","x":null}"#,
        r#"{"id":3,"n":null,"r":null,"t":null,"b":null,"x":"text in an untyped column"}"#,
    ];
    assert_eq!(text, expected.join("\n") + "\n");
    for line in text.lines() {
        serde_json::from_str::<Value>(line).expect("every line is JSON");
    }
}

#[tokio::test]
async fn the_encoder_handles_an_empty_table() {
    assert_eq!(ndjson_of("CREATE TABLE e (a);", "e").await, "");
}

#[tokio::test]
async fn the_sample_source_is_deterministic_and_fast() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let started = Instant::now();
    let summary = create_source_database(&a, 1).await.unwrap();
    let elapsed = started.elapsed();
    eprintln!("created the scale-1 source in {elapsed:?}");
    assert!(elapsed.as_secs_f64() < 3.0, "took {elapsed:?}");
    assert_eq!(summary.tables.len(), 6);
    assert_eq!(summary.total_rows(), 4500);
    create_source_database(&b, 1).await.unwrap();
    // Replacing an existing file works too.
    create_source_database(&b, 1).await.unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(matches!(
        create_source_database(&a, 0).await,
        Err(SampleError::ZeroScale)
    ));
}

/// Runs inspect, every table export, and archive; returns the shared dir's
/// root, the source, and the archive output.
async fn export(dir: &Path) -> (PathBuf, PathBuf, TaskOutput) {
    let source = dir.join("source.db");
    let summary = create_source_database(&source, 1).await.unwrap();
    let shared = dir.join("shared");

    let inspected = inspect(ctx("export.inspect", json!({}), &source))
        .await
        .unwrap();
    let mut names: Vec<&str> = summary.tables.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    assert_eq!(inspected.output, json!({ "tables": names }));
    assert_eq!(inspected.add_tasks.len(), 6);

    let rows: BTreeMap<&str, u64> = summary
        .tables
        .iter()
        .map(|t| (t.name.as_str(), t.rows))
        .collect();
    for task in &inspected.add_tasks {
        assert_eq!(
            (task.stage.as_str(), task.kind.as_str()),
            (EXPORT_STAGE, "export.table")
        );
        let c = ctx(&task.kind, task.payload.clone(), &source);
        let out = export_table(&shared, c.clone()).await.unwrap();
        let table = task.payload["table"].as_str().unwrap();
        let file = tables_dir(&shared, MIGRATION).join(format!("{table}.ndjson"));
        assert_eq!(out.output["rows"], json!(rows[table]));
        assert_eq!(out.output["file"], json!(file.display().to_string()));
        assert_eq!(out.output["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(c.progress_for_test(), (rows[table], rows[table]));
        let lines = std::fs::read_to_string(&file).unwrap();
        assert_eq!(lines.lines().count() as u64, rows[table]);
    }
    // A retried export replaces the file with an identical one.
    let again = export_table(
        &shared,
        ctx("export.table", json!({"table": "users"}), &source),
    )
    .await
    .unwrap();
    assert_eq!(again.output["rows"], json!(200));

    let archived = archive(&shared, ctx("export.archive", json!({}), &source))
        .await
        .unwrap();
    (shared, source, archived)
}

#[tokio::test]
async fn export_archive_and_verify_succeed_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, source, archived) = export(dir.path()).await;
    let path = archive_path(&shared, MIGRATION);
    assert_eq!(
        archived.output["archive"],
        json!(path.display().to_string())
    );
    assert_eq!(archived.output["tables"], json!(6));
    assert_eq!(archived.output["rows"], json!(4500));
    assert_eq!(
        archived.output["bytes"],
        json!(std::fs::metadata(&path).unwrap().len())
    );
    let leftovers: Vec<_> = std::fs::read_dir(migration_dir(&shared, MIGRATION))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let (manifest, files) = read_tar(&path);
    assert_eq!(manifest["migration_id"], json!(MIGRATION));
    assert_eq!(manifest["subject"], json!(format!("test/{MIGRATION}")));
    assert_eq!(manifest["source"], json!(source.display().to_string()));
    assert_eq!(
        manifest["tables"][0]["file"],
        json!("tables/comments.ndjson")
    );
    assert_eq!(files.len(), 7);

    let verified = verify(&shared, ctx("export.verify", json!({}), &source))
        .await
        .unwrap();
    assert_eq!(
        verified.output,
        json!({ "verified_tables": 6, "rows": 4500 })
    );
}

#[tokio::test]
async fn verify_detects_a_tampered_table_file() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, source, _) = export(dir.path()).await;
    let path = archive_path(&shared, MIGRATION);
    let (manifest, mut files) = read_tar(&path);
    let users = files.get_mut("tables/users.ndjson").unwrap();
    let text = String::from_utf8(users.clone())
        .unwrap()
        .replacen("user1", "mallory", 1);
    *users = text.into_bytes();
    write_tar(&path, &manifest, &files);

    let err = verify(&shared, ctx("export.verify", json!({}), &source))
        .await
        .unwrap_err();
    assert!(!err.retryable);
    assert!(
        err.message.contains("\"users\"") && err.message.contains("sha256"),
        "{err}"
    );
}

#[tokio::test]
async fn verify_detects_an_archive_that_no_longer_matches_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, source, _) = export(dir.path()).await;
    // Rebuild a self-consistent archive from an altered table file: only the
    // comparison with the source can catch it.
    let file = tables_dir(&shared, MIGRATION).join("labels.ndjson");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    f.write_all(b"{\"id\":999}\n").unwrap();
    archive(&shared, ctx("export.archive", json!({}), &source))
        .await
        .unwrap();

    let err = verify(&shared, ctx("export.verify", json!({}), &source))
        .await
        .unwrap_err();
    assert!(!err.retryable);
    assert!(
        err.message.contains("\"labels\"") && err.message.contains("re-exports"),
        "{err}"
    );

    // A table dropped from the source is named too.
    let options = SqliteConnectOptions::new().filename(&source);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::query("DROP TABLE comments")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let err = verify(&shared, ctx("export.verify", json!({}), &source))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("\"comments\"") && err.message.contains("not in the source"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_or_bad_source_is_a_fatal_error_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let missing = TaskContext::for_test("export.inspect", 1, json!({}), json!({}));
    let relative =
        TaskContext::for_test("export.inspect", 1, json!({}), json!({"source": "rel.db"}));
    let absent = ctx("export.inspect", json!({}), &dir.path().join("absent.db"));
    let not_a_db = dir.path().join("not-a-db");
    std::fs::write(
        &not_a_db,
        "hello, I am text and not SQLite at all, sorry about that",
    )
    .unwrap();
    let garbage = ctx("export.inspect", json!({}), &not_a_db);
    for c in [missing, relative, absent, garbage] {
        let err: TaskError = inspect(c).await.unwrap_err();
        assert!(
            !err.retryable && err.message.contains("parameter \"source\""),
            "{err}"
        );
    }
}

#[tokio::test]
async fn exporting_an_unknown_table_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("s.db");
    create_source_database(&source, 1).await.unwrap();
    for table in ["nope", "../etc", ".hidden"] {
        let err = export_table(
            dir.path(),
            ctx("export.table", json!({"table": table}), &source),
        )
        .await
        .unwrap_err();
        assert!(!err.retryable && err.message.contains(table), "{err}");
    }
}

#[test]
fn the_plan_has_the_four_stages() {
    let plan = plan_json();
    let stages: Vec<&str> = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["inspect", "export", "archive", "verify"]);
    assert_eq!(plan["stages"][1]["dynamic"], json!(true));
}

fn read_tar(path: &Path) -> (Value, BTreeMap<String, Vec<u8>>) {
    let mut archive = tar::Archive::new(GzDecoder::new(std::fs::File::open(path).unwrap()));
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        files.insert(name, bytes);
    }
    let manifest = serde_json::from_slice(&files["manifest.json"]).unwrap();
    (manifest, files)
}

fn write_tar(path: &Path, manifest: &Value, files: &BTreeMap<String, Vec<u8>>) {
    let gz = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let manifest = serde_json::to_vec(manifest).unwrap();
    let entries = std::iter::once(("manifest.json", manifest.as_slice())).chain(
        files
            .iter()
            .filter(|(n, _)| *n != "manifest.json")
            .map(|(n, b)| (n.as_str(), b.as_slice())),
    );
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, bytes).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}
