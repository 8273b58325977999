//! `/metrics` read as Prometheus would: a plain HTTP/1.1 GET over a TCP
//! socket ([`get`]), and a strict parser of the text format 0.0.4
//! ([`Scrape::parse`]).
//!
//! Written here rather than taken from a crate: a GET is a dozen lines
//! with tokio, and the parser checks more than a scraper's would — every
//! sample under a `# TYPE` of its family, one family per name, histogram
//! buckets cumulative and ending in `+Inf` equal to `_count` — so a
//! malformed exposition fails the test instead of being read leniently.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// `GET path` from `base` (`http://ADDR`), with `authorization: Bearer
/// TOKEN` when a token is given.
pub async fn get(base: &str, path: &str, token: Option<&str>) -> Answer {
    let addr = base
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{base:?} is not http://ADDR"));
    let mut conn = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n{auth}\r\n");
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.expect("read the answer");
    let raw = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        !headers.contains_key("transfer-encoding"),
        "a chunked answer; this client reads only content-length bodies: {headers:?}"
    );
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {headers:?}"));
    assert_eq!(body.len(), length, "the body is as long as it says");
    Answer {
        status,
        content_type: headers.get("content-type").cloned(),
        body: body.to_string(),
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_bucket`, `x_sum`, … for a histogram `x`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A metric family: its `# TYPE`, `# HELP` and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub kind: String,
    pub help: String,
    pub samples: Vec<Sample>,
}

/// A parsed exposition: families by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Scrape {
    pub families: BTreeMap<String, Family>,
}

impl Scrape {
    /// Parses the text format, strictly (module doc).
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut helps: BTreeMap<String, String> = BTreeMap::new();
        let mut current: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, help) = help.split_once(' ').unwrap_or((help, ""));
                helps.insert(name.to_string(), help.to_string());
            } else if let Some(ty) = line.strip_prefix("# TYPE ") {
                let (name, kind) = ty.split_once(' ').ok_or_else(|| at("no type".into()))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(at(format!("unknown type {kind}")));
                }
                check_name(name).map_err(at)?;
                let family = Family {
                    kind: kind.to_string(),
                    help: helps.get(name).cloned().unwrap_or_default(),
                    samples: Vec::new(),
                };
                if families.insert(name.to_string(), family).is_some() {
                    return Err(at(format!("a second # TYPE of {name}")));
                }
                current = Some(name.to_string());
            } else if line.starts_with('#') {
                continue;
            } else {
                let sample = parse_sample(line).map_err(at)?;
                let family = current
                    .as_deref()
                    .filter(|f| belongs(&sample.name, f, &families[*f].kind))
                    .ok_or_else(|| at("a sample outside the # TYPE of its family".into()))?;
                families
                    .get_mut(family)
                    .expect("current family")
                    .samples
                    .push(sample);
            }
        }
        for (name, family) in &families {
            if family.kind == "histogram" {
                check_histogram(name, family)?;
            }
        }
        Ok(Scrape { families })
    }

    /// The family `name`; panics, listing the families, if there is none.
    pub fn family(&self, name: &str) -> &Family {
        self.families.get(name).unwrap_or_else(|| {
            panic!(
                "no family {name}; there are {:?}",
                self.families.keys().collect::<Vec<_>>()
            )
        })
    }

    /// Asserts that family `name` exists with type `kind`.
    #[track_caller]
    pub fn assert_type(&self, name: &str, kind: &str) {
        assert_eq!(self.family(name).kind, kind, "type of {name}");
    }

    /// The sum of the samples named `sample` (in any family) whose labels
    /// include every one of `labels`; `None` when no sample matches.
    pub fn sum(&self, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .families
            .values()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == sample)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// [`Scrape::sum`], panicking when no sample matches.
    #[track_caller]
    pub fn value(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(sample, labels)
            .unwrap_or_else(|| panic!("no sample {sample} with labels {labels:?}"))
    }
}

/// Whether sample `name` belongs to family `family` of type `kind`.
fn belongs(name: &str, family: &str, kind: &str) -> bool {
    match kind {
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s) == Some(family)),
        "summary" => {
            name == family || name == format!("{family}_sum") || name == format!("{family}_count")
        }
        _ => name == family,
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if ok && !name.is_empty() {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

/// `name{k="v",…} value` (no timestamps: the coordinator sends none).
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (BTreeMap::new(), &line[name_end..]),
    };
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `k="v",…}` and what follows the `}`.
fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find("=\"").ok_or("a label without =\"")?;
        let key = &rest[..eq];
        check_name(key)?;
        let (mut value, mut escaped, mut end) = (String::new(), false, None);
        for (i, c) in rest[eq + 2..].char_indices() {
            match (escaped, c) {
                (true, 'n') => value.push('\n'),
                (true, '\\' | '"') => value.push(c),
                (true, c) => return Err(format!("bad escape \\{c}")),
                (false, '\\') => {}
                (false, '"') => {
                    end = Some(eq + 2 + i);
                    break;
                }
                (false, c) => value.push(c),
            }
            escaped = !escaped && c == '\\';
        }
        let end = end.ok_or("an unclosed label value")?;
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("a label not followed by , or }".into());
        }
    }
}

/// Each series' buckets rise and end in `+Inf`, which equals its `_count`.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let series = |s: &Sample| {
        let mut l = s.labels.clone();
        l.remove("le");
        l
    };
    let mut buckets: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for s in &family.samples {
        if s.name.ends_with("_bucket") {
            let le = s
                .labels
                .get("le")
                .ok_or(format!("{name}: a bucket without le"))?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().map_err(|_| format!("{name}: bad le {le}"))?
            };
            buckets.entry(series(s)).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(series(s), s.value);
        }
    }
    for (labels, b) in &buckets {
        let rising = b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let last = b.last().copied();
        if !rising
            || last.map(|l| l.0) != Some(f64::INFINITY)
            || last.map(|l| l.1) != counts.get(labels).copied()
        {
            return Err(format!(
                "{name}{labels:?}: buckets {b:?}, count {:?}",
                counts.get(labels)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_exposition_parses_and_sums() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total{k=\"x\",q=\"a\\\"b\"} 2\na_total{k=\"y\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n\
                    # TYPE g gauge\ng 7\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.family("a_total").help, "Things.");
        assert_eq!(s.value("a_total", &[]), 5.0);
        assert_eq!(s.value("a_total", &[("q", "a\"b")]), 2.0);
        assert_eq!(s.value("h_count", &[]), 2.0);
        assert_eq!(s.value("g", &[]), 7.0);
        assert_eq!(s.sum("g", &[("k", "x")]), None);
    }

    #[test]
    fn malformed_expositions_are_refused() {
        for bad in [
            "a 1\n",                                                 // no # TYPE
            "# TYPE a gauge\nb 1\n",                                 // another family's sample
            "# TYPE a gauge\n# TYPE a gauge\n",                      // a family twice
            "# TYPE a gauge\na{k=\"v} 1\n",                          // unclosed value
            "# TYPE a gauge\na one\n",                               // not a number
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_count 2\n", // no +Inf bucket
            "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
        ] {
            assert!(Scrape::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
