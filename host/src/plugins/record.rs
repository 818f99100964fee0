//! EMR records and images as plugins see them: a site's JSON record →
//! raw fields; canonical features → JSON; a decoded radiograph → the
//! `frame` a `preprocess-image` plugin gets.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Feature, Frame, ImageAttributes, PixelsData, RawField};
use crate::dicom::{CanonicalImage, DecodedFrame, ImageHeader, Samples};

/// Most fields accepted in one record.
pub const MAX_FIELDS: usize = 512;
/// Longest field name or value accepted, in bytes.
pub const MAX_FIELD_TEXT: usize = 4096;

/// Why a JSON record cannot be turned into raw fields.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not a JSON object of fields.
    #[error("EMR record must be a JSON object of fields, not {0}")]
    NotAnObject(&'static str),
    /// A field's value has an unusable shape.
    #[error("EMR field {field:?}: {reason}")]
    BadField {
        /// The field name (a site column name, never a value).
        field: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Too many fields, or a name or value too long.
    #[error("EMR record too large: {0}")]
    TooLarge(String),
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some(String::new()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// A site record as JSON — `{"O2SAT": 91, "TEMP_F": "100.4", "CREAT":
/// {"value": 97, "unit": "umol/L"}}` — as raw fields (value as text, unit
/// where given).
///
/// # Errors
/// [`RecordError`] for anything but an object of scalars or
/// `{value, unit}` objects, or a record over the size limits.
pub fn raw_fields_from_json(record: &Value) -> Result<Vec<RawField>, RecordError> {
    let Value::Object(map) = record else {
        return Err(RecordError::NotAnObject(kind(record)));
    };
    if map.len() > MAX_FIELDS {
        return Err(RecordError::TooLarge(format!(
            "{} fields (at most {MAX_FIELDS})",
            map.len()
        )));
    }
    map.iter()
        .map(|(name, value)| {
            if name.len() > MAX_FIELD_TEXT {
                return Err(RecordError::TooLarge(
                    "a field name is over 4096 bytes".to_owned(),
                ));
            }
            let bad = |reason| RecordError::BadField {
                field: name.clone(),
                reason,
            };
            let (text, unit) = match value {
                Value::Object(inner) => {
                    let v = inner
                        .get("value")
                        .ok_or_else(|| bad("an object needs \"value\""))?;
                    let unit = match inner.get("unit") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(u)) => Some(u.clone()),
                        Some(_) => return Err(bad("\"unit\" must be a string")),
                    };
                    if inner.keys().any(|k| k != "value" && k != "unit") {
                        return Err(bad("an object may only have \"value\" and \"unit\""));
                    }
                    (
                        scalar_text(v).ok_or_else(|| bad("\"value\" must be a scalar"))?,
                        unit,
                    )
                }
                other => (
                    scalar_text(other).ok_or_else(|| bad("must be a scalar or {value, unit}"))?,
                    None,
                ),
            };
            if text.len() > MAX_FIELD_TEXT
                || unit.as_ref().is_some_and(|u| u.len() > MAX_FIELD_TEXT)
            {
                return Err(RecordError::TooLarge(format!(
                    "field {name:?} is over 4096 bytes"
                )));
            }
            Ok(RawField {
                name: name.clone(),
                value: text,
                unit,
            })
        })
        .collect()
}

/// Canonical features as a JSON object `{name: value or null}`, in order.
pub fn features_to_json(features: &[Feature]) -> Value {
    let mut map = Map::new();
    for f in features {
        map.insert(
            f.name.clone(),
            f.value
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
        );
    }
    Value::Object(map)
}

/// What a `preprocess-image` plugin gets: the `frame` (header attributes
/// canonical preprocessing uses, and the canonical image) and the `pixels`
/// it may read (frame 1's modality values, stored × slope + intercept).
///
/// The decoded frame is moved into the `pixels` (shared, not converted):
/// rows become modality values only when a plugin reads them. Samples the
/// decoder produced are moved; samples borrowed from the file (native
/// transfer syntaxes) are copied once, at their stored width (1 or 2
/// bytes per pixel) — never widened to f32 for the whole frame.
pub fn image_frame(
    header: &ImageHeader,
    frame: DecodedFrame<'_>,
    canonical: &CanonicalImage,
) -> (Frame, PixelsData) {
    let slope = header.rescale_slope.filter(|&s| s != 0.0).unwrap_or(1.0);
    let intercept = header.rescale_intercept.unwrap_or(0.0);
    let (rows, columns) = (frame.rows, frame.columns);
    let owned = DecodedFrame {
        rows,
        columns,
        samples: match frame.samples {
            Samples::U8(s) => Samples::U8(Cow::Owned(s.into_owned())),
            Samples::U16(s) => Samples::U16(Cow::Owned(s.into_owned())),
            Samples::Stored(s) => Samples::Stored(s),
        },
        bits: frame.bits,
    };
    let pixels = PixelsData::new(Arc::new(owned), slope, intercept);
    let frame = Frame {
        rows,
        columns,
        attributes: ImageAttributes {
            modality: header.modality.clone().unwrap_or_default(),
            photometric_interpretation: header
                .photometric_interpretation
                .clone()
                .unwrap_or_default(),
            bits_stored: header.bits_stored.unwrap_or(0),
            signed: header.pixel_representation == Some(1),
            rescale_slope: slope,
            rescale_intercept: intercept,
            window_center: header.window_center.first().copied(),
            window_width: header.window_width.first().copied(),
            presentation_lut_shape: header.presentation_lut_shape.clone(),
            manufacturer: header.manufacturer.clone(),
        },
        size: canonical.size,
        canonical: canonical.data.clone(),
    };
    (frame, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_become_raw_fields() {
        let record = serde_json::json!({
            "O2SAT": 91,
            "TEMP_F": "100.4",
            "CREAT": {"value": 97.5, "unit": "umol/L"},
            "MISSING": null
        });
        let fields = raw_fields_from_json(&record).expect("ok");
        let get = |n: &str| fields.iter().find(|f| f.name == n).expect("field");
        assert_eq!(get("O2SAT").value, "91");
        assert_eq!(get("CREAT").unit.as_deref(), Some("umol/L"));
        assert_eq!(get("MISSING").value, "");
        assert!(raw_fields_from_json(&serde_json::json!([1, 2])).is_err());
        assert!(raw_fields_from_json(&serde_json::json!({"A": [1]})).is_err());
        assert!(raw_fields_from_json(&serde_json::json!({"A": {"unit": "x"}})).is_err());
    }
}
