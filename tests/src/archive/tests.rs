//! The oracle checked on itself: the sample source database reads back as
//! written, an archive made faithfully from it passes, and tampered ones fail
//! for the right reason.

use super::*;
use crate::sample::build_source_db;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use std::path::PathBuf;

/// Writes a tar.gz of `files` and returns its path.
fn write_archive(dir: &Path, name: &str, files: &BTreeMap<String, Vec<u8>>) -> PathBuf {
    let path = dir.join(name);
    let gz = GzEncoder::new(std::fs::File::create(&path).unwrap(), Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

/// The files of a correct export of `source`, built from the oracle's rows.
async fn faithful_files(source: &Path, migration_id: i64) -> BTreeMap<String, Vec<u8>> {
    let tables = read_source_tables(source).await.unwrap();
    let mut files = BTreeMap::new();
    let mut entries = Vec::new();
    for (name, rows) in &tables {
        let mut bytes = Vec::new();
        for row in rows {
            bytes.extend(serde_json::to_vec(row).unwrap());
            bytes.push(b'\n');
        }
        let file = format!("tables/{name}.ndjson");
        entries.push(json!({
            "name": name, "file": file, "rows": rows.len(),
            "sha256": hex::encode(Sha256::digest(&bytes)), "bytes": bytes.len(),
        }));
        files.insert(file, bytes);
    }
    let manifest = json!({
        "migration_id": migration_id, "subject": "project/1",
        "source": source.to_string_lossy(), "tables": entries,
    });
    files.insert(
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    );
    files
}

#[tokio::test]
async fn faithful_archive_passes_and_tampered_ones_fail() {
    let dir = tempfile::tempdir().unwrap();
    let source = build_source_db(&dir.path().join("source.db"))
        .await
        .unwrap();
    let files = faithful_files(&source.path, 3).await;

    let good = write_archive(dir.path(), "good.tar.gz", &files);
    let summary = check_archive(&good, &source.path, 3, "project/1")
        .await
        .unwrap_or_else(|e| panic!("{e:#?}"));
    let rows: Vec<(String, usize)> = summary.rows.into_iter().collect();
    assert_eq!(rows, source.tables);

    // Wrong migration id.
    let errors = check_archive(&good, &source.path, 4, "project/1")
        .await
        .unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("migration_id")),
        "{errors:?}"
    );

    // One value changed, with the manifest updated to match: only the
    // comparison with the source catches it.
    let mut changed = files.clone();
    let users = String::from_utf8(changed["tables/users.ndjson"].clone()).unwrap();
    let users = users.replacen("user-5\"", "user-6\"", 1).into_bytes();
    let manifest = reseal(&changed["manifest.json"], "users", &users);
    changed.insert("tables/users.ndjson".into(), users);
    changed.insert("manifest.json".into(), manifest);
    let path = write_archive(dir.path(), "changed.tar.gz", &changed);
    let errors = check_archive(&path, &source.path, 3, "project/1")
        .await
        .unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("users: row 5")),
        "{errors:?}"
    );

    // A file changed behind the manifest's back.
    let mut stale = files.clone();
    stale.get_mut("tables/labels.ndjson").unwrap().push(b' ');
    let path = write_archive(dir.path(), "stale.tar.gz", &stale);
    let errors = check_archive(&path, &source.path, 3, "project/1")
        .await
        .unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("labels: manifest sha256")),
        "{errors:?}"
    );

    // A table left out.
    let mut missing = files.clone();
    let manifest: Json = serde_json::from_slice(&missing["manifest.json"]).unwrap();
    let mut manifest = manifest.as_object().unwrap().clone();
    let tables: Vec<Json> = manifest["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] != "archived_pipelines")
        .cloned()
        .collect();
    manifest.insert("tables".into(), Json::Array(tables));
    missing.insert(
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    );
    let path = write_archive(dir.path(), "missing.tar.gz", &missing);
    let errors = check_archive(&path, &source.path, 3, "project/1")
        .await
        .unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("archived_pipelines")),
        "{errors:?}"
    );
}

/// The manifest with `table`'s sha256 and bytes recomputed for `bytes`.
fn reseal(manifest: &[u8], table: &str, bytes: &[u8]) -> Vec<u8> {
    let mut m: Json = serde_json::from_slice(manifest).unwrap();
    for t in m["tables"].as_array_mut().unwrap() {
        if t["name"] == table {
            t["sha256"] = json!(hex::encode(Sha256::digest(bytes)));
            t["bytes"] = json!(bytes.len());
        }
    }
    serde_json::to_vec(&m).unwrap()
}

#[test]
fn numbers_compare_by_value_but_integers_exactly() {
    assert!(json_eq(
        &json!({"a": 2, "b": [1.5]}),
        &json!({"b": [1.5], "a": 2.0})
    ));
    assert!(!json_eq(
        &json!(9007199254740993_i64),
        &json!(9007199254740992_i64)
    ));
    assert!(!json_eq(
        &json!(9007199254740993_i64),
        &json!(9007199254740992.0)
    ));
    assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": null})));
}
