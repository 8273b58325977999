//! Hostile field values: extreme numbers, empty and huge strings, NUL and
//! odd Unicode, deep and wide Structs, broken timestamps. Every generator
//! takes the request's own RNG, so one seed and request number give the same
//! value again.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};
use rand::Rng;
use rand::rngs::StdRng;

/// Strings that have broken parsers, databases and log lines elsewhere.
const NASTY: &[&str] = &[
    "",
    " ",
    "\0",
    "a\0b",
    "\u{feff}bom",
    "\u{202e}evil",
    "\u{fffd}\u{fffe}\u{ffff}",
    "\u{10ffff}",
    "e\u{301}\u{301}\u{301}\u{301}",
    "😀🧨",
    "\r\n\t",
    "'; DROP TABLE migrations; --",
    "%s%n%x",
    "../../../../etc/passwd",
    "${jndi:ldap://x}",
    "null",
    "-1",
    "9223372036854775808",
    "NaN",
    "project/1",
    "default",
    "noop",
    "{\"a\":",
];

/// A string: a name the coordinator knows (`known`), a plain short one, a
/// nasty one, a long one, or (rarely) one far over the request size limit.
pub fn string(rng: &mut StdRng, known: &[String]) -> String {
    match rng.random_range(0..100) {
        0..30 if !known.is_empty() => known[rng.random_range(0..known.len())].clone(),
        0..45 => format!("fz-{}", rng.random_range(0..1000u32)),
        45..75 => NASTY[rng.random_range(0..NASTY.len())].to_string(),
        75..85 => {
            let mut s = String::new();
            for _ in 0..rng.random_range(1..40) {
                s.push(random_char(rng));
            }
            s
        }
        85..97 => "x".repeat(rng.random_range(200..20_000)),
        97..99 => "é".repeat(rng.random_range(20_000..100_000)),
        // Megabytes, mostly under and sometimes over the 4 MiB default
        // limit; rare, or the run measures the loopback's bandwidth.
        _ if rng.random_ratio(1, 50) => "z".repeat(rng.random_range(1 << 20..5 << 20)),
        _ => "y".repeat(rng.random_range(1..200)),
    }
}

/// Any `char`, including controls, private use and the last code point.
fn random_char(rng: &mut StdRng) -> char {
    loop {
        let c = match rng.random_range(0..4) {
            0 => rng.random_range(0..0x20),
            1 => rng.random_range(0x20..0x7f),
            2 => rng.random_range(0x80..0x3000),
            _ => rng.random_range(0..0x11_0000),
        };
        if let Some(c) = char::from_u32(c) {
            return c;
        }
    }
}

/// An id: one the coordinator knows, or an extreme or random one.
pub fn id(rng: &mut StdRng, known: &[i64]) -> i64 {
    match rng.random_range(0..10) {
        0..6 if !known.is_empty() => known[rng.random_range(0..known.len())],
        0..6 => 1,
        6 => 0,
        7 => [-1, i64::MIN, i64::MAX, i64::MAX - 1][rng.random_range(0..4)],
        _ => rng.random_range(-1000..1_000_000),
    }
}

/// A u32 count: small, zero, or extreme.
pub fn count(rng: &mut StdRng) -> u32 {
    match rng.random_range(0..10) {
        0..5 => rng.random_range(0..10),
        5 => 0,
        6 => u32::MAX,
        7 => 1 << 31,
        8 => rng.random_range(1000..100_000),
        _ => rng.random(),
    }
}

/// A timestamp: near now, far past or future, or outside what it may hold.
pub fn timestamp(rng: &mut StdRng) -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (seconds, nanos) = match rng.random_range(0..8) {
        0 => (now + rng.random_range(-10..3600), 0),
        1 => (now - 86_400, 0),
        2 => (i64::MAX, i32::MAX),
        3 => (i64::MIN, i32::MIN),
        4 => (253_402_300_800, 0), // year 10000
        5 => (-62_135_596_801, 0), // before year 1
        6 => (now + 60, -1),
        _ => (rng.random(), rng.random()),
    };
    Timestamp { seconds, nanos }
}

/// A Struct: small and plain, or deep (past the 24-level limit), wide,
/// or holding NaN and infinities.
pub fn structure(rng: &mut StdRng) -> Struct {
    let kind = rng.random_range(0..10);
    structure_of(rng, kind)
}

/// Like [`structure`] but never wide, for Structs inside repeated fields
/// (a wide one in each of hundreds of tasks makes gigabytes).
pub fn small_structure(rng: &mut StdRng) -> Struct {
    let kind = rng.random_range(0..8);
    structure_of(rng, if kind == 7 { 9 } else { kind })
}

fn structure_of(rng: &mut StdRng, kind: u32) -> Struct {
    match kind {
        0..4 => Struct::default(),
        4..6 => {
            let n = rng.random_range(1..6);
            flat(rng, n)
        }
        6..8 => {
            let depth = rng.random_range(1..40);
            let mut s = flat(rng, 1);
            for _ in 0..depth {
                let inner = if rng.random_bool(0.5) {
                    Kind::StructValue(s)
                } else {
                    Kind::ListValue(ListValue {
                        values: vec![Value {
                            kind: Some(Kind::StructValue(s)),
                        }],
                    })
                };
                s = Struct {
                    fields: [("d".to_string(), Value { kind: Some(inner) })].into(),
                };
            }
            s
        }
        8 => {
            let n = rng.random_range(100..3000);
            flat(rng, n)
        }
        _ => Struct {
            fields: [
                ("nan".to_string(), number(f64::NAN)),
                ("inf".to_string(), number(f64::INFINITY)),
                ("-inf".to_string(), number(f64::NEG_INFINITY)),
                ("none".to_string(), Value { kind: None }),
                (String::new(), number(-0.0)),
                ("\0".to_string(), number(f64::MAX)),
            ]
            .into(),
        },
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn flat(rng: &mut StdRng, fields: usize) -> Struct {
    let mut s = Struct::default();
    for i in 0..fields {
        let kind = match rng.random_range(0..5) {
            0 => Kind::NullValue(rng.random_range(-2..3)),
            1 => Kind::NumberValue(f64::from_bits(rng.random())),
            // Short: a wide Struct of long strings is only a big request.
            2 => Kind::StringValue(NASTY[rng.random_range(0..NASTY.len())].to_string()),
            3 => Kind::BoolValue(rng.random()),
            _ => Kind::NumberValue(rng.random_range(-1e6..1e6)),
        };
        s.fields.insert(format!("k{i}"), Value { kind: Some(kind) });
    }
    s
}
