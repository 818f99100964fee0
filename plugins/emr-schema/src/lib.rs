//! The canonical EMR schema, v1: the 21 features the model reads, their
//! canonical units and physiologically plausible ranges, and the unit
//! conversions sites most often need. Pure Rust with no dependencies, so
//! plugins (wasm32-wasip2) and the host share one definition.
//!
//! A value outside its plausible range is not "abnormal" but impossible
//! (a typo, a unit mix-up): plugins reject it rather than pass it on.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Interface version of the plugin WIT this schema belongs to.
pub const SCHEMA_VERSION: &str = "1";

/// One canonical feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureSpec {
    /// Canonical name, e.g. `spo2_pct`.
    pub name: &'static str,
    /// Canonical unit, e.g. `%`.
    pub unit: &'static str,
    /// Smallest plausible value.
    pub min: f64,
    /// Largest plausible value.
    pub max: f64,
    /// Whether the value is a code (integer).
    pub integer: bool,
}

const fn f(name: &'static str, unit: &'static str, min: f64, max: f64) -> FeatureSpec {
    FeatureSpec {
        name,
        unit,
        min,
        max,
        integer: false,
    }
}

const fn code(name: &'static str, unit: &'static str, max: f64) -> FeatureSpec {
    FeatureSpec {
        name,
        unit,
        min: 0.0,
        max,
        integer: true,
    }
}

/// The schema, in the model's input order.
pub const FEATURES: [FeatureSpec; 21] = [
    f("age_years", "years", 0.0, 120.0),
    code("sex", "0 female, 1 male", 1.0),
    f("temperature_c", "°C", 25.0, 45.0),
    f("heart_rate_bpm", "/min", 20.0, 250.0),
    f("resp_rate_bpm", "/min", 4.0, 80.0),
    f("systolic_bp_mmhg", "mmHg", 40.0, 300.0),
    f("diastolic_bp_mmhg", "mmHg", 20.0, 200.0),
    f("spo2_pct", "%", 30.0, 100.0),
    code(
        "o2_device_at_triage",
        "0 room air, 1 low-flow, 2 high-flow/NIV, 3 ventilated",
        3.0,
    ),
    f("crp_mg_l", "mg/L", 0.0, 700.0),
    f("d_dimer_ng_ml_feu", "ng/mL FEU", 0.0, 100_000.0),
    f("ldh_u_l", "U/L", 30.0, 10_000.0),
    f("procalcitonin_ng_ml", "ng/mL", 0.0, 1_000.0),
    f("troponin_t_ng_l", "ng/L", 0.0, 100_000.0),
    f("wbc_e9_l", "10^9/L", 0.0, 500.0),
    f("lymphocytes_e9_l", "10^9/L", 0.0, 300.0),
    f("neutrophils_e9_l", "10^9/L", 0.0, 300.0),
    f("creatinine_mg_dl", "mg/dL", 0.05, 30.0),
    f("glucose_mg_dl", "mg/dL", 10.0, 2_000.0),
    f("ferritin_ng_ml", "ng/mL", 0.0, 100_000.0),
    f("sodium_mmol_l", "mmol/L", 90.0, 200.0),
];

/// The spec of a canonical feature, by name.
pub fn feature(name: &str) -> Option<&'static FeatureSpec> {
    FEATURES.iter().find(|f| f.name == name)
}

/// Why a value cannot be accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueError {
    /// Not a number.
    NotANumber(String),
    /// Outside the plausible range of the feature.
    Implausible {
        /// The canonical feature.
        feature: &'static str,
        /// The value, in the canonical unit.
        value: f64,
        /// The plausible range.
        min: f64,
        /// The plausible range.
        max: f64,
    },
    /// A code that is not an integer.
    NotACode(f64),
    /// A unit this schema cannot convert from.
    UnknownUnit(String),
}

impl core::fmt::Display for ValueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ValueError::NotANumber(text) => write!(f, "{text:?} is not a number"),
            ValueError::Implausible {
                feature,
                value,
                min,
                max,
            } => write!(
                f,
                "{feature} = {value} is physiologically impossible (plausible {min}..={max})"
            ),
            ValueError::NotACode(v) => write!(f, "{v} is not an integer code"),
            ValueError::UnknownUnit(u) => write!(f, "unknown unit {u:?}"),
        }
    }
}

/// Text that means "no value" in exports.
pub fn is_missing(text: &str) -> bool {
    let t = text.trim();
    t.is_empty()
        || ["na", "n/a", "nan", "null", "none", "missing", "-", "."]
            .iter()
            .any(|m| t.eq_ignore_ascii_case(m))
}

/// Parses a number, accepting a decimal comma ("37,5") as exports from
/// European systems write it.
pub fn parse_number(text: &str) -> Result<f64, ValueError> {
    let t = text.trim();
    let normalised;
    let t = if t.contains(',') && !t.contains('.') {
        normalised = t.replace(',', ".");
        normalised.as_str()
    } else {
        t
    };
    t.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| ValueError::NotANumber(text.to_owned()))
}

/// Checks a canonical value against its feature's plausible range.
pub fn check(spec: &FeatureSpec, value: f64) -> Result<f64, ValueError> {
    if !(spec.min..=spec.max).contains(&value) {
        return Err(ValueError::Implausible {
            feature: spec.name,
            value,
            min: spec.min,
            max: spec.max,
        });
    }
    if spec.integer && value.fract() != 0.0 {
        return Err(ValueError::NotACode(value));
    }
    Ok(value)
}

/// Longest unit text compared, in bytes (normalised).
const MAX_UNIT: usize = 48;

/// The unit normalised for comparison, written into `buf` without heap
/// allocation (plugins run a fresh instance per call, so every allocation
/// is paid for each request): ASCII lower case, spaces and '°' dropped,
/// 'µ' and 'μ' written as 'u'. `None` when it does not fit.
fn unit_key<'b>(unit: &str, buf: &'b mut [u8; MAX_UNIT]) -> Option<&'b str> {
    let mut n = 0;
    for c in unit.trim().chars() {
        let c = match c {
            'µ' | 'μ' => 'u',
            '°' | ' ' => continue,
            c => c.to_ascii_lowercase(),
        };
        let mut utf8 = [0u8; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        buf.get_mut(n..n + bytes.len())?.copy_from_slice(bytes);
        n += bytes.len();
    }
    core::str::from_utf8(&buf[..n]).ok()
}

/// Converts `value` in `unit` to the canonical unit of `spec`. Units are
/// matched loosely (case, spaces, µ/u, °). `None` or the canonical unit
/// leaves the value as it is.
///
/// Lymphocytes and neutrophils given as % of WBC need the WBC count: see
/// [`percent_of_wbc`].
pub fn to_canonical(spec: &FeatureSpec, value: f64, unit: Option<&str>) -> Result<f64, ValueError> {
    let Some(unit) = unit.filter(|u| !u.trim().is_empty()) else {
        return Ok(value);
    };
    let (mut buf, mut canonical_buf) = ([0u8; MAX_UNIT], [0u8; MAX_UNIT]);
    let key = unit_key(unit, &mut buf).ok_or_else(|| ValueError::UnknownUnit(unit.to_owned()))?;
    if Some(key) == unit_key(spec.unit, &mut canonical_buf) {
        return Ok(value);
    }
    let converted = match (spec.name, key) {
        ("age_years", "y" | "yr" | "yrs" | "year" | "a") => value,
        ("age_years", "months" | "mo") => value / 12.0,
        ("temperature_c", "c" | "degc" | "celsius") => value,
        ("temperature_c", "f" | "degf" | "fahrenheit") => (value - 32.0) * 5.0 / 9.0,
        ("temperature_c", "k" | "kelvin") => value - 273.15,
        (
            "heart_rate_bpm" | "resp_rate_bpm",
            "bpm" | "/min" | "min-1" | "1/min" | "breaths/min" | "beats/min",
        ) => value,
        ("systolic_bp_mmhg" | "diastolic_bp_mmhg", "mmhg" | "mm[hg]") => value,
        ("systolic_bp_mmhg" | "diastolic_bp_mmhg", "kpa") => value * 7.500_62,
        ("spo2_pct", "%" | "pct" | "percent") => value,
        ("spo2_pct", "fraction" | "1") => value * 100.0,
        ("crp_mg_l", "mg/l" | "ug/ml") => value,
        ("crp_mg_l", "mg/dl") => value * 10.0,
        ("crp_mg_l", "nmol/l") => value / 9.524,
        ("d_dimer_ng_ml_feu", "ng/mlfeu" | "ug/lfeu") => value,
        ("d_dimer_ng_ml_feu", "ug/mlfeu" | "mg/lfeu") => value * 1000.0,
        ("d_dimer_ng_ml_feu", "ng/mlddu" | "ug/lddu" | "ddu") => value * 2.0,
        ("d_dimer_ng_ml_feu", "ug/mlddu" | "mg/lddu") => value * 2000.0,
        ("ldh_u_l", "u/l" | "iu/l") => value,
        ("ldh_u_l", "ukat/l") => value * 60.0,
        ("procalcitonin_ng_ml", "ng/ml" | "ug/l") => value,
        ("troponin_t_ng_l", "ng/l" | "pg/ml") => value,
        ("troponin_t_ng_l", "ng/ml" | "ug/l") => value * 1000.0,
        (
            "wbc_e9_l" | "lymphocytes_e9_l" | "neutrophils_e9_l",
            "10^9/l" | "10*9/l" | "g/l" | "x10^9/l" | "10^3/ul" | "10*3/ul" | "k/ul" | "x10^3/ul",
        ) => value,
        ("wbc_e9_l" | "lymphocytes_e9_l" | "neutrophils_e9_l", "/ul" | "cells/ul" | "/mm3") => {
            value / 1000.0
        }
        ("creatinine_mg_dl", "mg/dl") => value,
        ("creatinine_mg_dl", "umol/l") => value / 88.42,
        ("glucose_mg_dl", "mg/dl") => value,
        ("glucose_mg_dl", "mmol/l") => value * 18.016,
        ("ferritin_ng_ml", "ng/ml" | "ug/l") => value,
        ("ferritin_ng_ml", "pmol/l") => value / 2.247,
        ("sodium_mmol_l", "mmol/l" | "meq/l") => value,
        _ => return Err(ValueError::UnknownUnit(unit.to_owned())),
    };
    Ok(converted)
}

/// Whether a unit says "percent of the white-cell count".
pub fn is_percent_of_wbc(unit: Option<&str>) -> bool {
    let mut buf = [0u8; MAX_UNIT];
    unit.and_then(|u| unit_key(u, &mut buf))
        .is_some_and(|k| matches!(k, "%" | "%wbc" | "%ofwbc" | "percent"))
}

/// A differential count given as % of WBC, in 10⁹/L.
pub fn percent_of_wbc(percent: f64, wbc_e9_l: f64) -> f64 {
    percent / 100.0 * wbc_e9_l
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> &'static FeatureSpec {
        feature(name).expect("feature")
    }

    #[test]
    fn schema_has_21_unique_features() {
        let mut names: Vec<_> = FEATURES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 21);
        assert!(FEATURES.iter().all(|f| f.min < f.max));
    }

    #[test]
    fn common_conversions() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(
            to_canonical(spec("temperature_c"), 100.4, Some("°F")).unwrap(),
            38.0
        ));
        assert!(close(
            to_canonical(spec("creatinine_mg_dl"), 88.42, Some("µmol/L")).unwrap(),
            1.0
        ));
        assert!(close(
            to_canonical(spec("glucose_mg_dl"), 5.0, Some("mmol/L")).unwrap(),
            90.08
        ));
        assert!(close(
            to_canonical(spec("crp_mg_l"), 2.5, Some("mg/dL")).unwrap(),
            25.0
        ));
        assert!(close(
            to_canonical(spec("d_dimer_ng_ml_feu"), 400.0, Some("ng/mL DDU")).unwrap(),
            800.0
        ));
        assert!(close(
            to_canonical(spec("wbc_e9_l"), 7200.0, Some("/uL")).unwrap(),
            7.2
        ));
        assert!(close(percent_of_wbc(20.0, 7.5), 1.5));
        assert!(is_percent_of_wbc(Some("% WBC")));
        assert_eq!(
            to_canonical(spec("sodium_mmol_l"), 140.0, Some("furlongs")),
            Err(ValueError::UnknownUnit("furlongs".into()))
        );
    }

    #[test]
    fn ranges_and_numbers() {
        assert!(check(spec("spo2_pct"), 92.0).is_ok());
        assert!(matches!(
            check(spec("spo2_pct"), 920.0),
            Err(ValueError::Implausible { .. })
        ));
        assert!(matches!(
            check(spec("sex"), 0.5),
            Err(ValueError::NotACode(_))
        ));
        assert_eq!(parse_number("37,5"), Ok(37.5));
        assert!(parse_number("abc").is_err());
        assert!(parse_number("inf").is_err());
        assert!(is_missing(" NA ") && is_missing("") && !is_missing("0"));
    }
}
