//! Plan files: a plan in JSON or YAML with the fields of the protocol's
//! `Plan` in snake_case (the document `PutPlan` takes as `plan_json`):
//!
//! ```yaml
//! name: project-export
//! description: export a project
//! stages:
//!   - name: tables
//!     retry: {max_attempts: 5}
//!     tasks:
//!       - {kind: export.table, payload: {table: users}}
//!       - {kind: export.table, payload: {table: issues}}
//!   - name: archive
//!     tasks: [{kind: export.archive}]
//! ```
//!
//! The PutPlan request itself is read too: the plan under `plan:`, or its
//! JSON text under `plan_json:` (what grpcurl users already have on disk).
//! The file is read here and sent as JSON; the coordinator validates it
//! and names the field at fault (`stages[0].tasks[1].kind`).

use std::io::Read;
use std::path::Path;

use serde_json::Value as Json;

use crate::error::CliError;

/// The plan in `path` (`-` for standard input) as JSON text. `.json` files
/// are read as JSON, everything else as YAML (which JSON also is).
pub fn read(path: &Path) -> Result<String, CliError> {
    let shown = path.display().to_string();
    let error = |reason: String| CliError::File {
        path: shown.clone(),
        reason,
    };
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| error(format!("cannot read standard input: {e}")))?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| error(format!("cannot read it: {e}")))?
    };
    let is_json = path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("json"));
    let doc: Json = if is_json {
        serde_json::from_str(&text).map_err(|e| error(format!("not valid JSON: {e}")))?
    } else {
        serde_norway::from_str(&text).map_err(|e| error(format!("not valid YAML: {e}")))?
    };
    let expected = || {
        error(
            "expected a plan: a mapping with name and stages, e.g. {name: p, stages: [...]}".into(),
        )
    };
    let Json::Object(fields) = doc else {
        return Err(expected());
    };
    // A PutPlan request rather than a plan: its one field holds the plan.
    match (fields.len(), fields.get("plan"), fields.get("plan_json")) {
        (1, Some(plan @ Json::Object(_)), _) => Ok(plan.to_string()),
        (1, _, Some(Json::String(text))) => Ok(text.clone()),
        (1, Some(_), _) | (1, _, Some(_)) => Err(expected()),
        _ => Ok(Json::Object(fields).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("p.yaml");
        std::fs::write(
            &yaml,
            "name: p\nstages:\n  - name: s\n    tasks: [{kind: noop}]\n",
        )
        .unwrap();
        let json = dir.path().join("p.json");
        std::fs::write(
            &json,
            r#"{"name":"p","stages":[{"name":"s","tasks":[{"kind":"noop"}]}]}"#,
        )
        .unwrap();
        assert_eq!(read(&yaml).unwrap(), read(&json).unwrap());
    }

    #[test]
    fn a_put_plan_request_gives_its_plan() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("p.yaml");
        std::fs::write(
            &plain,
            "name: p\nstages: [{name: s, tasks: [{kind: noop}]}]\n",
        )
        .unwrap();
        let request = dir.path().join("request.yaml");
        std::fs::write(
            &request,
            "plan:\n  name: p\n  stages: [{name: s, tasks: [{kind: noop}]}]\n",
        )
        .unwrap();
        assert_eq!(read(&request).unwrap(), read(&plain).unwrap());
        let text = dir.path().join("request.json");
        std::fs::write(&text, r#"{"plan_json": "{\"name\":\"p\"}"}"#).unwrap();
        assert_eq!(read(&text).unwrap(), r#"{"name":"p"}"#);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.yaml");
        std::fs::write(&list, "- a\n- b\n").unwrap();
        let e = read(&list).unwrap_err().to_string();
        assert!(e.ends_with("list.yaml: expected a plan: a mapping with name and stages, e.g. {name: p, stages: [...]}"), "{e}");
        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, "{").unwrap();
        assert!(
            read(&broken)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        let e = read(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.yaml: cannot read it"), "{e}");
    }
}
