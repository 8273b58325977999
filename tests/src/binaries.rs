//! Finds the `coordinator` and `worker` executables, building them first.
//!
//! `env!("CARGO_BIN_EXE_…")` only exists for binaries of the package under
//! test, and ours live in other packages; so each test process runs `cargo
//! build --bins -p stagecoach-coordinator-bin -p stagecoach-worker-bin` once, with
//! the same cargo, profile and target directory as the test binary itself, so
//! the tests always run the code of the current tree. Cargo releases its
//! build-directory lock before it runs tests, so this does not deadlock under
//! `cargo test`; when another build holds the lock, it waits.
//!
//! Set `STAGECOACH_BIN_DIR` to a directory holding both executables to skip
//! the build (e.g. when testing installed binaries).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The two executables the end-to-end tests start.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Path of the `coordinator` executable.
    pub coordinator: PathBuf,
    /// Path of the `worker` executable.
    pub worker: PathBuf,
}

static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();

/// Returns the built executables, building them on the first call of this
/// process. Panics with cargo's output if the build fails.
pub fn binaries() -> &'static Binaries {
    match BINARIES.get_or_init(locate_or_build) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn locate_or_build() -> Result<Binaries, String> {
    if let Some(dir) = std::env::var_os("STAGECOACH_BIN_DIR") {
        return existing(Path::new(&dir));
    }
    let layout = BuildLayout::of_current_exe()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--bins", "-p", "stagecoach-coordinator-bin"])
        .args(["-p", "stagecoach-worker-bin", "--target-dir"])
        .arg(&layout.target_dir)
        .args(["--profile", &layout.profile]);
    if let Some(triple) = &layout.target_triple {
        cmd.args(["--target", triple]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the coordinator and worker failed ({}): {cmd:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    existing(&layout.profile_dir)
}

fn existing(dir: &Path) -> Result<Binaries, String> {
    let b = Binaries {
        coordinator: dir.join(exe("coordinator")),
        worker: dir.join(exe("worker")),
    };
    for p in [&b.coordinator, &b.worker] {
        if !p.is_file() {
            return Err(format!("executable {} does not exist", p.display()));
        }
    }
    Ok(b)
}

fn exe(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// Where cargo put the running test binary, and so where `cargo build` with
/// the same settings puts the executables.
#[derive(Debug)]
struct BuildLayout {
    /// `target/<profile dir>` or `target/<triple>/<profile dir>`.
    profile_dir: PathBuf,
    target_dir: PathBuf,
    profile: String,
    target_triple: Option<String>,
}

impl BuildLayout {
    fn of_current_exe() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        // Test binaries live in `<profile dir>/deps/`.
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| format!("unexpected test binary location {}", exe.display()))?
            .to_path_buf();
        let dir_name = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("unexpected profile dir {}", profile_dir.display()))?;
        // The `dev` and `test` profiles build into `debug/`, `release` and
        // `bench` into `release/`; custom profiles into their own name.
        let profile = match dir_name {
            "debug" => "dev",
            other => other,
        }
        .to_string();
        let parent = profile_dir
            .parent()
            .ok_or_else(|| format!("unexpected profile dir {}", profile_dir.display()))?;
        // `target/` itself holds CACHEDIR.TAG; `target/<triple>/` does not.
        let (target_dir, target_triple) = if parent.join("CACHEDIR.TAG").exists() {
            (parent.to_path_buf(), None)
        } else {
            let triple = parent
                .file_name()
                .and_then(|n| n.to_str())
                .map(String::from);
            let root = parent.parent().unwrap_or(parent).to_path_buf();
            (root, triple)
        };
        Ok(Self {
            profile_dir,
            target_dir,
            profile,
            target_triple,
        })
    }
}
