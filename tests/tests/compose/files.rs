//! Reading `docker-compose.yml` and the `Dockerfile` into the few facts the
//! tests check and use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_norway::Value;

/// The image the Dockerfile builds, as the compose file names it.
pub const IMAGE: &str = "stagecoach:local";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// One service of docker-compose.yml, merge keys applied.
#[derive(Debug, Clone, Default)]
pub struct Service {
    pub image: Option<String>,
    pub build: bool,
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// `(source, mount point)`.
    pub volumes: Vec<(String, String)>,
    /// The `CMD` form of `healthcheck.test`, without the `CMD`.
    pub healthcheck: Option<Vec<String>>,
    pub ports: Vec<String>,
    pub profiles: Vec<String>,
    pub container_name: Option<String>,
    pub depends_on: BTreeMap<String, String>,
    /// `(config name, mount point)` of the file's top-level `configs`.
    pub configs: Vec<(String, String)>,
}

impl Service {
    pub fn env(&self, key: &str) -> Option<&str> {
        self.environment
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn runs_our_image(&self) -> bool {
        self.image.as_deref() == Some(IMAGE)
    }
}

pub fn compose() -> BTreeMap<String, Service> {
    let path = repo_root().join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("read docker-compose.yml");
    let mut doc: Value = serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    doc.apply_merge().expect("merge keys apply");
    let services = doc["services"]
        .as_mapping()
        .expect("docker-compose.yml has services");
    services
        .iter()
        .map(|(name, s)| {
            let name = name
                .as_str()
                .expect("service names are strings")
                .to_string();
            assert!(
                s.as_mapping().is_some_and(|m| !m.contains_key("<<")),
                "service {name}: a nested merge key was left unmerged"
            );
            (name.clone(), service(&name, s))
        })
        .collect()
}

fn service(name: &str, s: &Value) -> Service {
    let strings = |v: &Value, what: &str| -> Vec<String> {
        match v {
            Value::Null => Vec::new(),
            Value::Sequence(items) => items.iter().map(|i| scalar(i, name, what)).collect(),
            other => panic!("service {name}: {what} must be a list (exec form), got {other:?}"),
        }
    };
    let environment = match &s["environment"] {
        Value::Null => Vec::new(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                (
                    scalar(k, name, "environment"),
                    scalar(v, name, "environment"),
                )
            })
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let kv = scalar(i, name, "environment");
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        other => panic!("service {name}: unexpected environment {other:?}"),
    };
    let volumes = strings(&s["volumes"], "volumes")
        .iter()
        .map(|v| {
            let mut parts = v.split(':');
            let source = parts.next().unwrap_or_default().to_string();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("service {name}: volume {v:?} has no mount point"));
            (source, target.to_string())
        })
        .collect();
    let healthcheck = match &s["healthcheck"]["test"] {
        Value::Null => None,
        Value::Sequence(_) => {
            let test = strings(&s["healthcheck"]["test"], "healthcheck.test");
            assert_eq!(
                test.first().map(String::as_str),
                Some("CMD"),
                "service {name}: use the exec form [\"CMD\", …] (the image has no shell tools)"
            );
            Some(test[1..].to_vec())
        }
        other => panic!("service {name}: healthcheck.test must be a list, got {other:?}"),
    };
    let depends_on = match &s["depends_on"] {
        Value::Null => BTreeMap::new(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                (
                    scalar(k, name, "depends_on"),
                    v["condition"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| (scalar(i, name, "depends_on"), String::new()))
            .collect(),
        other => panic!("service {name}: unexpected depends_on {other:?}"),
    };
    Service {
        image: s["image"].as_str().map(String::from),
        build: !s["build"].is_null(),
        command: strings(&s["command"], "command"),
        environment,
        volumes,
        healthcheck,
        ports: strings(&s["ports"], "ports"),
        profiles: strings(&s["profiles"], "profiles"),
        container_name: s["container_name"].as_str().map(String::from),
        depends_on,
        configs: configs(name, &s["configs"]),
    }
}

fn configs(name: &str, v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Null => Vec::new(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| match i {
                Value::String(source) => (source.clone(), format!("/{source}")),
                other => {
                    let source = scalar(&other["source"], name, "configs.source");
                    let target = match &other["target"] {
                        Value::Null => format!("/{source}"),
                        t => scalar(t, name, "configs.target"),
                    };
                    (source, target)
                }
            })
            .collect(),
        other => panic!("service {name}: configs must be a list, got {other:?}"),
    }
}

/// The file's top-level `configs` given inline: name → content.
pub fn config_contents() -> BTreeMap<String, String> {
    let path = repo_root().join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("read docker-compose.yml");
    let doc: Value = serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    match &doc["configs"] {
        Value::Null => BTreeMap::new(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let name = k.as_str().expect("config names are strings").to_string();
                let content = v["content"]
                    .as_str()
                    .unwrap_or_else(|| panic!("config {name}: give its `content` inline"))
                    .to_string();
                (name, content)
            })
            .collect(),
        other => panic!("configs must be a mapping, got {other:?}"),
    }
}

fn scalar(v: &Value, service: &str, what: &str) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("service {service}: {what}: expected a scalar, got {other:?}"),
    }
}

/// What the Dockerfile's final image holds.
#[derive(Debug)]
pub struct Image {
    pub build_from: String,
    pub run_from: String,
    /// `--bin` names of the release build.
    pub built: BTreeSet<String>,
    /// Files copied from the build stage into /usr/local/bin.
    pub installed: BTreeSet<String>,
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    pub installs_ca_certificates: bool,
}

pub fn dockerfile() -> Image {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("read Dockerfile");
    // Join continuation lines, drop comments.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    lines.push(std::mem::take(&mut current));
                }
                current.clear();
            }
        }
    }
    let froms: Vec<&String> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a run stage: {froms:?}");
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    let final_stage = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    let mut built = BTreeSet::new();
    let mut installed = BTreeSet::new();
    let mut user = None;
    let mut env = Vec::new();
    let mut installs_ca_certificates = false;
    for (i, line) in lines.iter().enumerate() {
        let w = words(line);
        if line.contains("cargo build") {
            assert!(line.contains("--release"), "a release build: {line}");
            for pair in w.windows(2) {
                if pair[0] == "--bin" {
                    built.insert(pair[1].clone());
                }
            }
        }
        if i > final_stage {
            match w[0].as_str() {
                "COPY" if w.iter().any(|x| x.starts_with("--from=")) => {
                    let (dest, sources) = w[1..].split_last().expect("COPY has a destination");
                    if dest.trim_end_matches('/') == "/usr/local/bin" {
                        for s in sources.iter().filter(|s| !s.starts_with("--")) {
                            installed.insert(s.rsplit('/').next().unwrap_or(s).to_string());
                        }
                    }
                }
                "USER" => user = Some(w[1].clone()),
                "ENV" => {
                    for kv in &w[1..] {
                        let (k, v) = kv.split_once('=').expect("ENV KEY=VALUE");
                        env.push((k.to_string(), v.to_string()));
                    }
                }
                "RUN" if line.contains("apt-get install") && line.contains("ca-certificates") => {
                    installs_ca_certificates = true;
                }
                _ => {}
            }
        }
    }
    Image {
        build_from: words(froms[0])[1].clone(),
        run_from: words(froms[1])[1].clone(),
        built,
        installed,
        user,
        env,
        installs_ca_certificates,
    }
}
