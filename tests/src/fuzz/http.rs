//! Hostile requests to the HTTP port (`--http-listen`: health, metrics,
//! the dashboard and its JSON API): random methods, paths, ids and query
//! strings, oversized and broken headers, and bytes that are not HTTP.
//! Any answer below 500 is fine; a 5xx, or no answer at all to a request
//! that is well-formed HTTP, is a violation.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::values::string;

/// Paths the HTTP port serves, or nearly; `{id}` becomes a number.
const PATHS: &[&str] = &[
    "/",
    "/healthz",
    "/metrics",
    "/api/migrations",
    "/api/migrations/{id}",
    "/api/migrations/{id}/events",
    "/api/pools",
    "/api/workers",
    "/api/events",
    "/api/live",
    "/index.html",
    "/app.js",
    "/style.css",
    "/../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/api/%00",
];

/// Query parameters the API takes, or nearly.
const KEYS: &[&str] = &[
    "state",
    "subject",
    "pool",
    "page_size",
    "page_token",
    "after",
    "after_event_id",
    "limit",
    "id",
    "migration",
];

/// One request to the HTTP port.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    /// The bytes sent on a fresh connection.
    pub bytes: Vec<u8>,
    /// Whether they form a well-formed HTTP/1.1 request (which must be
    /// answered).
    pub well_formed: bool,
}

impl HttpProbe {
    pub fn generate(rng: &mut StdRng, migrations: &[i64]) -> HttpProbe {
        if rng.random_ratio(1, 10) {
            let mut bytes: Vec<u8> = (0..rng.random_range(0..2048))
                .map(|_| rng.random())
                .collect();
            if rng.random_bool(0.5) {
                bytes.splice(0..0, b"GET /api/migrations HTTP/1.1\r\n".iter().copied());
            }
            return HttpProbe {
                bytes,
                well_formed: false,
            };
        }
        let method = [
            "GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
        ][rng.random_range(0..8)];
        let id = if !migrations.is_empty() && rng.random_bool(0.6) {
            migrations[rng.random_range(0..migrations.len())].to_string()
        } else {
            [
                "0",
                "-1",
                "9223372036854775807",
                "99999999999999999999",
                "abc",
                "1e3",
                "",
            ][rng.random_range(0..7)]
            .to_string()
        };
        let mut target = PATHS[rng.random_range(0..PATHS.len())].replace("{id}", &id);
        for i in 0..rng.random_range(0..4) {
            target.push(if i == 0 { '?' } else { '&' });
            target.push_str(KEYS[rng.random_range(0..KEYS.len())]);
            target.push('=');
            target.push_str(&encode(&value(rng)));
        }
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: fuzz\r\n");
        if rng.random_ratio(1, 10) {
            head.push_str(&format!(
                "Authorization: Bearer {}\r\n",
                encode(&string(rng, &[]))
            ));
        }
        if rng.random_ratio(1, 20) {
            // A header far past any sane size.
            head.push_str(&format!(
                "X-Big: {}\r\n",
                "a".repeat(rng.random_range(1..200_000))
            ));
        }
        let body = if method == "POST" || method == "PUT" {
            string(rng, &[]).into_bytes()
        } else {
            Vec::new()
        };
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let mut bytes = head.into_bytes();
        bytes.extend(body);
        HttpProbe {
            bytes,
            well_formed: true,
        }
    }

    /// The report's name for it.
    pub fn rpc(&self) -> &'static str {
        if self.well_formed {
            "http"
        } else {
            "http-garbage"
        }
    }

    /// Sends it and reads the status code of the answer: `None` when the
    /// connection closed (or stayed silent for 10 s) without one.
    pub async fn send(&self, addr: SocketAddr) -> Option<u16> {
        let exchange = async {
            let mut conn = TcpStream::connect(addr).await.ok()?;
            // The server may answer (431, 400) and close before reading all.
            let _ = conn.write_all(&self.bytes).await;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            status_code(&head)
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .ok()
            .flatten()
    }
}

/// The code of an HTTP/1.x status line (`HTTP/1.1 404 Not Found`).
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// A query value: hostile strings, numbers out of range, odd encodings.
fn value(rng: &mut StdRng) -> String {
    match rng.random_range(0..6) {
        0 => rng.random::<i64>().to_string(),
        1 => "99999999999999999999999".into(),
        2 => ["running", "failed", "queued", "succeeded", "canceled", "x"][rng.random_range(0..6)]
            .into(),
        3 => "%".repeat(rng.random_range(1..5)),
        _ => string(rng, &[]),
    }
}

/// Percent-encodes what may not appear raw in a request line, except `%`
/// (so broken escapes reach the server).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes().take(16_384) {
        if b.is_ascii_alphanumeric() || b"-_.~%/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_code(b"HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(status_code(b"garbage"), None);
        assert_eq!(status_code(b""), None);
    }
}
