//! The tokens file: one token a line, `ROLE NAME SHA256HEX [WORKER_IDS]`,
//! where the hex is the SHA-256 of the token. Blank lines and lines starting
//! with `#` are skipped. A worker token may end with the worker ids it may
//! act as, comma-separated, each exact or a prefix ending in `*`
//! (`eu-*,backup-1`): its holder cannot subscribe, heartbeat or report as any
//! other worker, on any coordinator. Only hashes are stored, so the file is no secret to read, and a
//! presented token is found by hashing it and comparing digests in constant
//! time.

use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::Role;

/// Why a tokens file cannot be used, with its line number where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("tokens file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "tokens file {path}, line {line}: {message}; lines are `ROLE NAME SHA256HEX [WORKER_IDS]` (see `coordinator token create`)"
    )]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// One accepted token.
#[derive(Debug, Clone)]
pub struct Entry {
    pub role: Role,
    pub name: String,
    /// The worker ids a worker token may act as; `None`: any.
    pub worker_ids: Option<WorkerIds>,
    digest: [u8; 32],
}

/// Worker ids a token is bound to: each exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIds(Vec<String>);

impl WorkerIds {
    /// Parses `eu-*,backup-1`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let ids: Vec<String> = list.split(',').map(str::to_string).collect();
        for id in &ids {
            let stem = id.strip_suffix('*').unwrap_or(id);
            let ok = stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'))
                && (!stem.is_empty() || id == "*")
                && id.len() <= 200;
            if !ok {
                return Err(format!(
                    "worker ids {list:?}: give ids or prefixes ending in '*', comma-separated, \
                     e.g. eu-*,backup-1"
                ));
            }
        }
        Ok(Self(ids))
    }

    /// Whether `worker_id` is one of these.
    pub fn allows(&self, worker_id: &str) -> bool {
        self.0.iter().any(|id| match id.strip_suffix('*') {
            Some(prefix) => worker_id.starts_with(prefix),
            None => worker_id == id,
        })
    }
}

impl std::fmt::Display for WorkerIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// The accepted tokens, as read from the file.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    entries: Vec<Entry>,
}

impl TokenTable {
    pub fn read(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, message)| TokenFileError::Line {
            path: path.to_path_buf(),
            line,
            message,
        })
    }

    /// Parses the file's text; an error is `(line number, what is wrong)`.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (role, name, hex, ids) = match fields[..] {
                [role, name, hex] => (role, name, hex, None),
                [role, name, hex, ids] => (role, name, hex, Some(ids)),
                _ => {
                    return Err((
                        n,
                        format!("{} fields where 3 or 4 are needed", fields.len()),
                    ));
                }
            };
            let role: Role = role.parse().map_err(|e| (n, e))?;
            let worker_ids = match ids {
                Some(_) if role != Role::Worker => {
                    return Err((
                        n,
                        format!("only worker tokens are bound to worker ids, not {role}"),
                    ));
                }
                Some(ids) => Some(WorkerIds::parse(ids).map_err(|e| (n, e))?),
                None => None,
            };
            check_name(name).map_err(|e| (n, e))?;
            let digest = parse_digest(hex).map_err(|e| (n, e))?;
            if let Some(other) = entries.iter().find(|e| e.digest == digest) {
                return Err((
                    n,
                    format!(
                        "the same token hash as {:?} above; make a new token",
                        other.name
                    ),
                ));
            }
            entries.push(Entry {
                role,
                name: name.to_string(),
                worker_ids,
                digest,
            });
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `token`, if it is accepted. The digest is compared with
    /// every entry, each in constant time, so the answer's timing does not
    /// tell how much of a guess was right.
    pub fn find(&self, token: &str) -> Option<&Entry> {
        let digest = sha256(token);
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(&e.digest, &digest) {
                found = Some(e);
            }
        }
        found
    }
}

/// A fresh token (256 random bits) and the tokens-file line that accepts it,
/// bound to `worker_ids` when given (worker tokens only).
pub fn new_token(
    role: Role,
    name: &str,
    worker_ids: Option<&str>,
) -> Result<(String, String), String> {
    check_name(name)?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("sct_{}", hex::encode(bytes));
    let mut line = format!("{role} {name} {}", hex::encode(sha256(&token)));
    if let Some(ids) = worker_ids {
        if role != Role::Worker {
            return Err(format!(
                "only worker tokens are bound to worker ids, not {role}"
            ));
        }
        line.push(' ');
        line.push_str(&WorkerIds::parse(ids)?.to_string());
    }
    Ok((token, line))
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Token names appear in the event log and in logs: printable, no spaces.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?}: use 1-64 characters of letters, digits, '-', '_', '.', '@'"
        ))
    }
}

fn parse_digest(hex: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex).map_err(|_| {
        format!("{hex:?} is not hex; the third field is the SHA-256 of the token, 64 hex digits")
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "the hash has {} hex digits where a SHA-256 has 64 (is that the token itself? store only its hash)",
            b.len() * 2
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_token_is_found_by_its_line() {
        let (token, line) = new_token(Role::Viewer, "ops-alice", None).unwrap();
        assert!(token.len() >= 4 + 32, "at least 128 bits: {token}");
        let table = TokenTable::parse(&format!("# ops\n\n{line}\n")).unwrap();
        let e = table.find(&token).unwrap();
        assert_eq!((e.role, e.name.as_str()), (Role::Viewer, "ops-alice"));
        assert!(table.find("sct_nope").is_none());
        assert!(!line.contains(&token[4..]), "the line holds no secret");
    }

    #[test]
    fn bad_lines_name_their_number_and_fault() {
        let (_, good) = new_token(Role::Admin, "root", None).unwrap();
        let cases = [
            ("admin root", "2 fields"),
            ("admin root 00 w-*", "only worker tokens"),
            ("boss root 00", "unknown role \"boss\""),
            ("admin ro\u{e9}t 00", "name"),
            ("admin root xyz", "not hex"),
            ("admin root abcd", "4 hex digits"),
        ];
        for (bad, words) in cases {
            let (line, message) = TokenTable::parse(&format!("{good}\n# c\n{bad}\n")).unwrap_err();
            assert_eq!(line, 3, "{bad}");
            assert!(message.contains(words), "{bad}: {message}");
        }
        let (line, message) = TokenTable::parse(&format!("{good}\n{good}\n")).unwrap_err();
        assert_eq!(line, 2);
        assert!(message.contains("same token hash"), "{message}");
        assert!(new_token(Role::Admin, "two words", None).is_err());
    }

    #[test]
    fn a_worker_token_may_be_bound_to_worker_ids() {
        let (token, line) = new_token(Role::Worker, "fleet-eu", Some("eu-*,backup-1")).unwrap();
        assert!(line.ends_with(" eu-*,backup-1"), "{line}");
        let table = TokenTable::parse(&line).unwrap();
        let ids = table.find(&token).unwrap().worker_ids.clone().unwrap();
        assert!(ids.allows("eu-7") && ids.allows("backup-1"));
        assert!(!ids.allows("us-1") && !ids.allows("backup-12"));
        assert!(new_token(Role::Client, "c", Some("eu-*")).is_err());
        assert!(new_token(Role::Worker, "w", Some("eu *")).is_err());
    }
}
