//! `docker-compose.yml` and the `Dockerfile`, checked without Docker.
//!
//! No Docker engine runs where these tests run, so they check what can be
//! checked without one:
//!
//! - the Dockerfile builds exactly the binaries the compose services run,
//!   into a slim non-root image ([`the_image_has_the_binaries_the_services_run`]);
//! - every coordinator and worker service starts from the locally built
//!   binaries with exactly the `command` and `environment` the file gives
//!   (plus the image's `ENV`), each coordinator's `healthcheck` command exits
//!   0, two replicas of the worker service connect, and the `sample` service
//!   runs the sample export to success ([`the_services_start_as_the_file_says`]).
//!
//! Only what Docker itself would provide is replaced: host names
//! (`postgres`, `coordinator-a`, …) and container ports become free ports on
//! 127.0.0.1, volume mount points become temporary directories, and
//! PostgreSQL is the throwaway server of
//! `coordinator/tests/support/postgres.rs`, set up with the role and database
//! the `postgres` service's environment names. Where PostgreSQL is not
//! installed, each coordinator gets a SQLite file instead; the test prints
//! which it used.
//!
//! Before the sample runs, coordinator-b is stopped (as `docker compose stop`
//! would), so the workers streaming from it must move to coordinator-a: the
//! failover of real processes. (On SQLite the two coordinators do not share
//! a database, so this also keeps the sample's migration and the workers on
//! the same one.)

#[path = "../../coordinator/tests/support/postgres.rs"]
mod postgres;

#[path = "compose/files.rs"]
mod files;
#[path = "compose/local.rs"]
mod local;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use files::{IMAGE, compose, config_contents, dockerfile, repo_root};
use local::{
    Local, Proc, free_port, host_port, postgres_installed, run_once, start_postgres,
    wait_connected, wait_healthy,
};
use stagecoach_tests::Client;

#[test]
fn the_image_has_the_binaries_the_services_run() {
    let image = dockerfile();
    assert!(
        image.build_from.starts_with("rust:"),
        "built with the official Rust image, not {}",
        image.build_from
    );
    assert_eq!(image.run_from, "debian:bookworm-slim");
    assert!(
        image.build_from.contains("bookworm"),
        "build on the run image's Debian release (same glibc): {}",
        image.build_from
    );
    // The services run the first two; the CLI is there for operators.
    let all: BTreeSet<String> = ["coordinator", "worker", "stagecoach"]
        .map(String::from)
        .into();
    assert_eq!(image.built, all, "cargo build --bin …");
    assert_eq!(image.installed, all, "COPY --from=build … /usr/local/bin/");
    assert!(image.installs_ca_certificates, "ca-certificates installed");
    let user = image.user.as_deref().expect("a USER line");
    assert!(
        !matches!(user, "root" | "0" | "0:0"),
        "runs as a non-root user, not {user}"
    );

    let services = compose();
    let ours: Vec<&String> = services
        .iter()
        .filter(|(_, s)| s.runs_our_image())
        .map(|(n, _)| n)
        .collect();
    for name in ["coordinator-a", "coordinator-b", "worker", "sample"] {
        assert!(
            ours.contains(&&name.to_string()),
            "service {name} runs {IMAGE}"
        );
    }
    for (name, s) in services.iter().filter(|(_, s)| s.runs_our_image()) {
        assert!(
            s.build,
            "service {name}: `build: .` so `up --build` makes {IMAGE}"
        );
        let program = s
            .command
            .first()
            .unwrap_or_else(|| panic!("service {name} has a command"));
        assert!(
            image.installed.contains(program),
            "service {name} runs {program:?}, which the image does not have ({:?})",
            image.installed
        );
        if let Some(check) = &s.healthcheck {
            assert!(
                image.installed.contains(&check[0]),
                "service {name}'s health check runs {:?}, which the image does not have",
                check[0]
            );
        }
        for (source, _) in &s.volumes {
            assert!(
                !source.starts_with('/') && !source.starts_with('.'),
                "service {name}: named volumes only, not host paths ({source})"
            );
        }
    }

    let postgres = &services["postgres"];
    assert_eq!(postgres.image.as_deref(), Some("postgres:15"));
    assert_eq!(
        postgres.healthcheck.as_ref().map(|c| c[0].as_str()),
        Some("pg_isready")
    );
    for name in ["coordinator-a", "coordinator-b"] {
        let c = &services[name];
        assert_eq!(c.command[..2], ["coordinator", "serve"], "{name}");
        assert_eq!(c.env("STAGECOACH_LISTEN"), Some("0.0.0.0:50051"), "{name}");
        assert!(
            c.env("STAGECOACH_DATABASE_URL")
                .is_some_and(|u| u.starts_with("postgres://") && u.contains("@postgres:5432/")),
            "{name} uses the postgres service"
        );
        assert_eq!(
            c.depends_on.get("postgres").map(String::as_str),
            Some("service_healthy"),
            "{name} waits for PostgreSQL"
        );
        assert!(c.healthcheck.is_some(), "{name} has a health check");
    }
    // Listening on every interface, the coordinators require tokens, and
    // the worker and sample services hold tokens of the right roles.
    let contents = config_contents();
    for name in ["coordinator-a", "coordinator-b"] {
        let c = &services[name];
        let file = c
            .env("STAGECOACH_AUTH_TOKENS")
            .unwrap_or_else(|| panic!("{name} has a tokens file (STAGECOACH_AUTH_TOKENS)"));
        let (source, _) = c
            .configs
            .iter()
            .find(|(_, target)| target == file)
            .unwrap_or_else(|| panic!("{name}: {file} is a config mounted there"));
        assert!(contents.contains_key(source), "config {source} is defined");
    }
    let tokens = &contents[&services["coordinator-a"].configs[0].0];
    for (name, role) in [("worker", "worker"), ("sample", "client")] {
        let token = services[name]
            .env("STAGECOACH_TOKEN")
            .unwrap_or_else(|| panic!("{name} sends a token (STAGECOACH_TOKEN)"));
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
        assert!(
            tokens.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 3 && f[0] == role && f[2] == hash
            }),
            "{name}'s token is in the tokens file with role {role}"
        );
    }
    assert_eq!(
        services["coordinator-a"].ports,
        ["50051:50051", "9464:9464"]
    );
    assert_eq!(
        services["coordinator-b"].ports,
        ["50052:50051", "9465:9464"]
    );
    let worker = &services["worker"];
    assert_eq!(worker.command[0], "worker");
    assert!(
        worker.ports.is_empty() && worker.container_name.is_none(),
        "the worker service scales: no host port, no container name"
    );
    assert!(
        worker
            .volumes
            .iter()
            .any(|(_, target)| Some(target.as_str()) == worker.env("STAGECOACH_SHARED_DIR")),
        "the worker's shared directory is a volume"
    );
    assert_eq!(services["sample"].profiles, ["sample"]);

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    let ignored: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(
        ignored.contains(&"target/") && ignored.contains(&".git"),
        "{ignored:?}"
    );
}

/// A viewer token for this test: `coordinator token create`'s two lines.
async fn viewer_token() -> (String, String) {
    let out = tokio::process::Command::new(&stagecoach_tests::binaries::binaries().coordinator)
        .args([
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "compose-test",
        ])
        .output()
        .await
        .expect("coordinator token create");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = text.lines().map(String::from);
    (lines.next().unwrap(), lines.next().unwrap())
}

#[tokio::test]
async fn the_services_start_as_the_file_says() {
    let services = compose();
    let image = dockerfile();
    let tmp = tempfile::Builder::new()
        .prefix("stagecoach-compose-")
        .tempdir()
        .expect("a temporary directory");
    let dir = tmp.path().to_path_buf();

    let coordinators: Vec<String> = services
        .iter()
        .filter(|(_, s)| {
            s.runs_our_image() && s.command.first().map(String::as_str) == Some("coordinator")
        })
        .map(|(n, _)| n.clone())
        .collect();
    assert!(coordinators.len() >= 2, "{coordinators:?}");

    // Host names and ports, as Docker's network would resolve them.
    let mut hosts = BTreeMap::new();
    for name in &coordinators {
        let listen = services[name]
            .env("STAGECOACH_LISTEN")
            .unwrap_or_else(|| panic!("{name} sets STAGECOACH_LISTEN"));
        hosts.insert(
            (name.clone(), host_port(listen)),
            format!("127.0.0.1:{}", free_port()),
        );
        if let Some(http) = services[name].env("STAGECOACH_HTTP_LISTEN") {
            hosts.insert(
                (name.clone(), host_port(http)),
                format!("127.0.0.1:{}", free_port()),
            );
        }
    }
    let postgres = if postgres_installed() {
        let port = start_postgres(&services["postgres"]).await;
        hosts.insert(("postgres".to_string(), 5432), format!("127.0.0.1:{port}"));
        eprintln!("database: PostgreSQL (the throwaway test server on port {port})");
        Some(port)
    } else {
        eprintln!(
            "database: SQLite, one file per coordinator (PostgreSQL is not installed here; \
             `apt-get install postgresql` to test with it)"
        );
        None
    };
    let mut mounts = BTreeMap::new();
    for s in services.values() {
        for (source, target) in &s.volumes {
            let local = dir.join("volumes").join(source);
            std::fs::create_dir_all(&local).expect("create a volume directory");
            mounts.insert(target.clone(), local);
        }
    }
    // Config files (the tokens file) as Docker would mount them; this test
    // adds a viewer token of its own, as an operator would, to read the
    // cluster.
    let (viewer, viewer_line) = viewer_token().await;
    let contents = config_contents();
    for s in services.values() {
        for (source, target) in &s.configs {
            let file = dir.join("configs").join(source);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, format!("{}{viewer_line}\n", contents[source]))
                .expect("write a config file");
            mounts.insert(target.clone(), file);
        }
    }
    let local = Local {
        dir: dir.clone(),
        hosts,
        mounts,
        postgres,
        services: services.keys().cloned().collect(),
    };

    // The coordinators, each until its health check passes.
    let mut procs: BTreeMap<String, Proc> = BTreeMap::new();
    for name in &coordinators {
        let s = &services[name];
        let cmd = local.command(name, s, &image, &s.command);
        procs.insert(name.clone(), Proc::start(name, cmd, &dir));
    }
    for name in &coordinators {
        let proc = procs.get_mut(name).expect("started");
        wait_healthy(&local, name, &services[name], &image, proc).await;
    }

    // Two replicas of the worker service (`--scale worker=2`).
    let worker = &services["worker"];
    let mut workers: Vec<Proc> = (1..=2)
        .map(|i| {
            let cmd = local.command("worker", worker, &image, &worker.command);
            Proc::start(&format!("worker-{i}"), cmd, &dir)
        })
        .collect();
    let mut clients = Vec::new();
    for name in &coordinators {
        clients.push((
            name.as_str(),
            Client::connect_with_token(&local.url(name), Some(&viewer)).await,
        ));
    }
    let seen = wait_connected(
        "both replicas to connect",
        &clients,
        |c| c.values().flatten().collect::<BTreeSet<_>>().len() == 2,
        &mut workers,
    )
    .await;
    eprintln!("workers connected: {seen:?}");

    // coordinator-b goes away: its workers move to coordinator-a.
    let gone = coordinators.last().expect("two coordinators").clone();
    let stays = coordinators[0].clone();
    let status = procs.get_mut(&gone).expect("started").stop().await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{gone} stops cleanly on SIGTERM: {status:?}"
    );
    let remaining: Vec<(&str, Client)> = clients.into_iter().filter(|(n, _)| *n != gone).collect();
    wait_connected(
        &format!("both workers on {stays}"),
        &remaining,
        |c| c[&stays].len() == 2,
        &mut workers,
    )
    .await;
    if !seen[&gone].is_empty() {
        let (from, to) = (local.url(&gone), local.url(&stays));
        assert!(
            workers.iter().any(|w| w.logs().lines().any(|l| {
                l.contains("WARN")
                    && l.contains("switching to another coordinator")
                    && l.contains(&format!("from={from}"))
                    && l.contains(&format!("to={to}"))
            })),
            "a worker that streamed from {gone} logged its switch from {from} to {to}"
        );
    }

    // The sample service, run once against the cluster.
    let sample = &services["sample"];
    let cmd = local.command("sample", sample, &image, &sample.command);
    let (status, out) = run_once("sample", cmd, &dir, Duration::from_secs(180)).await;
    assert!(
        status.success(),
        "the sample service failed ({status}):\n{out}"
    );
    let archive = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("archive"))
        .map(|p| PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("the sample names its archive:\n{out}"));
    assert!(
        archive.starts_with(dir.join("volumes")) && archive.is_file(),
        "the archive {} is in the shared volume",
        archive.display()
    );
    let id: i64 = out
        .lines()
        .find_map(|l| l.strip_prefix("migration "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("the sample names its migration:\n{out}"));
    let (m, _) = remaining[0].1.check(id).await;
    assert_eq!(m.subject, "project/sample");

    for w in &mut workers {
        let status = w.stop().await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{}: {status:?}",
            w.name
        );
    }
    let status = procs.get_mut(&stays).expect("started").stop().await;
    assert!(status.is_some_and(|s| s.success()), "{stays}: {status:?}");
}
