//! Conversions between `google.protobuf.Struct` (how payloads, parameters and
//! outputs travel on the wire, so grpcurl users write plain JSON objects) and
//! `serde_json::Value` (how the coordinator stores them and handlers read them).

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// Converts a protobuf `Struct` to a JSON object. A missing struct is `{}`.
pub fn struct_to_json(s: Option<&Struct>) -> Json {
    Json::Object(
        s.map(|s| {
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect::<Map<_, _>>()
        })
        .unwrap_or_default(),
    )
}

/// Converts a JSON value to a protobuf `Struct`. A value that is not an object
/// is wrapped as `{"value": …}` so nothing is silently dropped.
pub fn json_to_struct(json: &Json) -> Struct {
    match json {
        Json::Object(map) => Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        },
        Json::Null => Struct::default(),
        other => Struct {
            fields: [("value".to_string(), json_to_value(other))].into(),
        },
    }
}

fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        // JSON numbers in a Struct are doubles; keep integers integral so
        // `{"rows": 3}` does not come back as `3.0`.
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Json::Number(Number::from(*n as i64))
            } else {
                Number::from_f64(*n).map_or(Json::Null, Json::Number)
            }
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::StructValue(s)) => struct_to_json(Some(s)),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
    }
}

fn json_to_value(j: &Json) -> Value {
    let kind = match j {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(json_to_struct(j)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_nested_json() {
        let j = serde_json::json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": -7}});
        assert_eq!(struct_to_json(Some(&json_to_struct(&j))), j);
    }

    #[test]
    fn missing_struct_is_empty_object() {
        assert_eq!(struct_to_json(None), serde_json::json!({}));
    }
}
