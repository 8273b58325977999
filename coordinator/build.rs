//! Rebuilds the coordinator when a migration is added or edited.
//!
//! `sqlx::migrate!` embeds `migrations/` at compile time, and Cargo reruns a
//! macro only when a file it already knows about changes: a new migration is
//! a new file, so without this a build (and the tests) would go on migrating
//! to the schema of the previous build. This is the build script sqlx
//! recommends (`sqlx migrate build-script`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
