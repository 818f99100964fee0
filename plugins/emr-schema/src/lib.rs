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
    /// Text that is not one of the codes a helper reads ([`sex_code`]).
    UnknownCode {
        /// The canonical feature.
        feature: &'static str,
        /// The text given.
        text: String,
    },
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
            ValueError::UnknownCode { feature, text } => {
                write!(f, "{text:?} is not a known {feature} code")
            }
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

/// How a value in an accepted unit becomes the canonical unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Conversion {
    /// Already canonical (another spelling of the same unit).
    Same,
    /// Multiply by the factor.
    Multiply(f64),
    /// Divide by the divisor.
    Divide(f64),
    /// Degrees Fahrenheit to Celsius: (v − 32) × 5/9.
    FahrenheitToCelsius,
    /// Kelvin to Celsius: v − 273.15.
    KelvinToCelsius,
}

impl Conversion {
    /// Applies the conversion.
    pub fn apply(self, value: f64) -> f64 {
        match self {
            Conversion::Same => value,
            Conversion::Multiply(k) => value * k,
            Conversion::Divide(k) => value / k,
            Conversion::FahrenheitToCelsius => (value - 32.0) * 5.0 / 9.0,
            Conversion::KelvinToCelsius => value - 273.15,
        }
    }

    /// How the conversion reads in the units table.
    pub fn describe(self) -> String {
        match self {
            Conversion::Same => "as is".to_owned(),
            Conversion::Multiply(k) => format!("× {k}"),
            Conversion::Divide(k) => format!("÷ {k}"),
            Conversion::FahrenheitToCelsius => "(v − 32) × 5/9".to_owned(),
            Conversion::KelvinToCelsius => "v − 273.15".to_owned(),
        }
    }
}

/// Unit spellings the schema accepts for some features, and how they
/// convert. Spellings match loosely: case, spaces and '°' are ignored, and
/// 'µ'/'μ' read as 'u' (so `µmol/L`, `umol/l` and `UMOL / L` are one
/// spelling). The canonical unit of each feature ([`FeatureSpec::unit`]) is
/// always accepted as well.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitRule {
    /// The canonical features these spellings apply to.
    pub features: &'static [&'static str],
    /// The accepted spellings, as written in the units table.
    pub spellings: &'static [&'static str],
    /// How a value in one of these spellings becomes canonical.
    pub conversion: Conversion,
}

const fn rule(
    features: &'static [&'static str],
    spellings: &'static [&'static str],
    conversion: Conversion,
) -> UnitRule {
    UnitRule {
        features,
        spellings,
        conversion,
    }
}

const RATES: &[&str] = &["heart_rate_bpm", "resp_rate_bpm"];
const BLOOD_PRESSURE: &[&str] = &["systolic_bp_mmhg", "diastolic_bp_mmhg"];
const CELL_COUNTS: &[&str] = &["wbc_e9_l", "lymphocytes_e9_l", "neutrophils_e9_l"];

/// The accepted unit spellings per feature: the data [`to_canonical`] uses
/// and from which plugins/README.md's units table is generated
/// ([`units_table_markdown`]). Add a spelling here, never in a plugin.
pub const UNIT_RULES: &[UnitRule] = &[
    rule(
        &["age_years"],
        &["y", "yr", "yrs", "year", "a"],
        Conversion::Same,
    ),
    rule(
        &["age_years"],
        &["months", "month", "mo", "mos"],
        Conversion::Divide(12.0),
    ),
    rule(&["temperature_c"], &["degC", "celsius"], Conversion::Same),
    rule(
        &["temperature_c"],
        &["°F", "degF", "fahrenheit"],
        Conversion::FahrenheitToCelsius,
    ),
    rule(
        &["temperature_c"],
        &["K", "kelvin"],
        Conversion::KelvinToCelsius,
    ),
    rule(
        RATES,
        &["bpm", "min-1", "1/min", "breaths/min", "beats/min"],
        Conversion::Same,
    ),
    rule(BLOOD_PRESSURE, &["mm[Hg]"], Conversion::Same),
    rule(BLOOD_PRESSURE, &["kPa"], Conversion::Multiply(7.500_62)),
    rule(&["spo2_pct"], &["pct", "percent"], Conversion::Same),
    rule(
        &["spo2_pct"],
        &["fraction", "1"],
        Conversion::Multiply(100.0),
    ),
    rule(&["crp_mg_l"], &["µg/mL"], Conversion::Same),
    rule(&["crp_mg_l"], &["mg/dL"], Conversion::Multiply(10.0)),
    rule(&["crp_mg_l"], &["nmol/L"], Conversion::Divide(9.524)),
    rule(&["d_dimer_ng_ml_feu"], &["µg/L FEU"], Conversion::Same),
    rule(
        &["d_dimer_ng_ml_feu"],
        &["µg/mL FEU", "mg/L FEU"],
        Conversion::Multiply(1000.0),
    ),
    rule(
        &["d_dimer_ng_ml_feu"],
        &["ng/mL DDU", "µg/L DDU", "DDU"],
        Conversion::Multiply(2.0),
    ),
    rule(
        &["d_dimer_ng_ml_feu"],
        &["µg/mL DDU", "mg/L DDU"],
        Conversion::Multiply(2000.0),
    ),
    rule(&["ldh_u_l"], &["IU/L"], Conversion::Same),
    rule(&["ldh_u_l"], &["µkat/L"], Conversion::Multiply(60.0)),
    rule(&["procalcitonin_ng_ml"], &["µg/L"], Conversion::Same),
    rule(&["troponin_t_ng_l"], &["pg/mL"], Conversion::Same),
    rule(
        &["troponin_t_ng_l"],
        &["ng/mL", "µg/L"],
        Conversion::Multiply(1000.0),
    ),
    rule(
        CELL_COUNTS,
        &[
            "10*9/L",
            "G/L",
            "x10^9/L",
            "10^3/µL",
            "10*3/µL",
            "K/µL",
            "x10^3/µL",
        ],
        Conversion::Same,
    ),
    rule(
        CELL_COUNTS,
        &["/µL", "cells/µL", "/mm3"],
        Conversion::Divide(1000.0),
    ),
    rule(
        &["creatinine_mg_dl"],
        &["µmol/L"],
        Conversion::Divide(88.42),
    ),
    rule(
        &["glucose_mg_dl"],
        &["mmol/L"],
        Conversion::Multiply(18.016),
    ),
    rule(&["ferritin_ng_ml"], &["µg/L"], Conversion::Same),
    rule(&["ferritin_ng_ml"], &["pmol/L"], Conversion::Divide(2.247)),
    rule(&["sodium_mmol_l"], &["mEq/L"], Conversion::Same),
];

/// The conversion from `unit` for `spec`, if the schema knows the unit
/// (the canonical unit, or a spelling in [`UNIT_RULES`]).
pub fn conversion(spec: &FeatureSpec, unit: &str) -> Option<Conversion> {
    let (mut buf, mut other) = ([0u8; MAX_UNIT], [0u8; MAX_UNIT]);
    let key = unit_key(unit, &mut buf)?;
    if Some(key) == unit_key(spec.unit, &mut other) {
        return Some(Conversion::Same);
    }
    UNIT_RULES
        .iter()
        .filter(|r| r.features.contains(&spec.name))
        .find(|r| {
            r.spellings
                .iter()
                .any(|s| unit_key(s, &mut other) == Some(key))
        })
        .map(|r| r.conversion)
}

/// Converts `value` in `unit` to the canonical unit of `spec`. Units are
/// matched loosely (case, spaces, µ/u, °; see [`UNIT_RULES`]). `None` or the
/// canonical unit leaves the value as it is.
///
/// Lymphocytes and neutrophils given as % of WBC need the WBC count: see
/// [`percent_of_wbc`].
pub fn to_canonical(spec: &FeatureSpec, value: f64, unit: Option<&str>) -> Result<f64, ValueError> {
    let Some(unit) = unit.filter(|u| !u.trim().is_empty()) else {
        return Ok(value);
    };
    conversion(spec, unit)
        .map(|c| c.apply(value))
        .ok_or_else(|| ValueError::UnknownUnit(unit.to_owned()))
}

/// The Markdown table of accepted units, one row per feature with a unit
/// (codes have none), as embedded in plugins/README.md between
/// `<!-- units-table:begin -->` and `<!-- units-table:end -->`. Regenerate
/// with `cargo run --manifest-path plugins/Cargo.toml --example units_table
/// -p oxbox-emr-schema`; a unit test fails while the README differs.
pub fn units_table_markdown() -> String {
    let mut out = String::from(
        "| feature | canonical unit | also accepted (→ conversion) |\n|---|---|---|\n",
    );
    for spec in FEATURES.iter().filter(|f| !f.integer) {
        let accepted: Vec<String> = UNIT_RULES
            .iter()
            .filter(|r| r.features.contains(&spec.name))
            .map(|r| {
                let spellings: Vec<String> = r.spellings.iter().map(|s| format!("`{s}`")).collect();
                format!("{} ({})", spellings.join(", "), r.conversion.describe())
            })
            .collect();
        let accepted = if accepted.is_empty() {
            "—".to_owned()
        } else {
            accepted.join("; ")
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {accepted} |\n",
            spec.name, spec.unit
        ));
    }
    out
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

/// Oxygen delivery device classes of `o2_device_at_triage`, in order
/// (index = code): the table plugins/README.md documents.
pub const O2_DEVICE_CLASSES: [&str; 4] = [
    "room air (no supplemental oxygen)",
    "low-flow oxygen (nasal cannula, simple, Venturi or non-rebreather mask)",
    "high-flow nasal oxygen or non-invasive ventilation (HFNC, CPAP, BiPAP)",
    "invasive mechanical ventilation (intubated, tracheostomy on a ventilator, ECMO)",
];

/// Words (lower case, whole words of the text) that name each device class,
/// most intensive class first; [`o2_device_class`] reads them.
const O2_DEVICE_WORDS: [(u8, &[&str]); 4] = [
    (
        3,
        &[
            "mv",
            "ett",
            "vent",
            "ventilator",
            "ventilated",
            "intubated",
            "intubation",
            "imv",
            "ecmo",
        ],
    ),
    (
        2,
        &[
            "hfnc",
            "hfno",
            "hfo",
            "highflow",
            "niv",
            "nippv",
            "bipap",
            "cpap",
            "optiflow",
            "airvo",
            "noninvasive",
        ],
    ),
    (
        1,
        &[
            "nc",
            "nasal",
            "cannula",
            "prongs",
            "mask",
            "fm",
            "sm",
            "vm",
            "nrb",
            "nrm",
            "rebreather",
            "nonrebreather",
            "venturi",
            "venti",
            "ventimask",
            "o2",
            "oxygen",
            "lowflow",
        ],
    ),
    (0, &["ra", "room", "roomair", "ambient", "none", "no"]),
];

/// Reads free text about the oxygen delivery device at triage ("NRB mask",
/// "nasal cannula 2L", "HFNC", "room air", "non-invasive ventilation",
/// "intubated") as a device class 0–3 of `o2_device_at_triage` (see
/// [`O2_DEVICE_CLASSES`]). Words are matched whole and case-insensitively;
/// "high flow", "non invasive", "non-rebreather" and "low flow" are read as
/// one word each; the most intensive class named wins ("HFNC" is high-flow
/// although it is a nasal cannula). "Non-invasive ventilation" is class 2,
/// not 3. `None` when no word is known: reject the field, do not guess.
pub fn o2_device_class(text: &str) -> Option<u8> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    // Two-word phrases read as one word: "high flow" → "highflow".
    let mut joined: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let pair = words.get(i + 1).map(|next| format!("{}{next}", words[i]));
        match pair.as_deref() {
            Some(p @ ("highflow" | "noninvasive" | "nonrebreather" | "lowflow" | "roomair")) => {
                joined.push(p.to_owned());
                i += 2;
            }
            _ => {
                joined.push(words[i].to_owned());
                i += 1;
            }
        }
    }
    if joined.iter().any(|w| w == "noninvasive") {
        return Some(2);
    }
    O2_DEVICE_WORDS
        .iter()
        .find(|(_, names)| joined.iter().any(|w| names.contains(&w.as_str())))
        .map(|(class, _)| *class)
}

/// Reads a sex code: `F`, `female`, `W`, `woman` → 0; `M`, `male`, `man`
/// → 1 (case-insensitive); `U`, `unknown`, `X`, `other`, `O`, `not
/// specified` and missing text ([`is_missing`]) → `None` (the model then
/// treats sex as missing). Anything else is [`ValueError::UnknownCode`]:
/// reject it, naming the field.
pub fn sex_code(text: &str) -> Result<Option<f64>, ValueError> {
    let t = text.trim();
    if is_missing(t) {
        return Ok(None);
    }
    let is = |names: &[&str]| names.iter().any(|n| t.eq_ignore_ascii_case(n));
    if is(&["f", "female", "w", "woman"]) {
        Ok(Some(0.0))
    } else if is(&["m", "male", "man"]) {
        Ok(Some(1.0))
    } else if is(&["u", "unk", "unknown", "x", "o", "other", "not specified"]) {
        Ok(None)
    } else {
        Err(ValueError::UnknownCode {
            feature: "sex",
            text: t.to_owned(),
        })
    }
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

    #[test]
    fn every_spelling_in_the_table_converts() {
        for rule in UNIT_RULES {
            for name in rule.features {
                let spec = feature(name).unwrap_or_else(|| panic!("{name} not in schema"));
                for spelling in rule.spellings {
                    assert_eq!(
                        conversion(spec, spelling),
                        Some(rule.conversion),
                        "{name} in {spelling:?}"
                    );
                    // Loose matching: case and spaces do not matter.
                    let shouted = format!(" {} ", spelling.to_ascii_uppercase());
                    assert!(to_canonical(spec, 1.0, Some(&shouted)).is_ok(), "{shouted}");
                }
            }
        }
    }

    #[test]
    fn no_spelling_is_listed_twice_for_a_feature() {
        for spec in &FEATURES {
            let mut keys = Vec::new();
            let mut buf = [0u8; MAX_UNIT];
            keys.push(unit_key(spec.unit, &mut buf).expect("fits").to_owned());
            for rule in UNIT_RULES
                .iter()
                .filter(|r| r.features.contains(&spec.name))
            {
                for s in rule.spellings {
                    let key = unit_key(s, &mut buf).expect("fits").to_owned();
                    assert!(!keys.contains(&key), "{}: {s:?} listed twice", spec.name);
                    keys.push(key);
                }
            }
        }
    }

    #[test]
    fn singular_and_plural_months_both_convert() {
        let age = spec("age_years");
        assert_eq!(to_canonical(age, 18.0, Some("months")), Ok(1.5));
        assert_eq!(to_canonical(age, 18.0, Some("Month")), Ok(1.5));
        assert_eq!(
            to_canonical(age, 18.0, Some("moons")),
            Err(ValueError::UnknownUnit("moons".into()))
        );
    }

    /// plugins/README.md embeds the generated table; this fails while the two
    /// differ (regenerate with the `units_table` example).
    #[test]
    fn readme_units_table_is_in_sync() {
        let readme = include_str!("../../README.md");
        let begin = "<!-- units-table:begin -->\n";
        let end = "<!-- units-table:end -->";
        let start = readme
            .find(begin)
            .expect("begin marker in plugins/README.md")
            + begin.len();
        let stop = readme[start..].find(end).expect("end marker") + start;
        assert_eq!(
            &readme[start..stop],
            units_table_markdown(),
            "plugins/README.md units table is stale: run \
             `cargo run --manifest-path plugins/Cargo.toml -p oxbox-emr-schema --example units_table` \
             and paste its output between the markers"
        );
    }

    #[test]
    fn oxygen_device_text() {
        let cases = [
            ("room air", Some(0)),
            ("RA", Some(0)),
            ("none", Some(0)),
            ("NRB mask", Some(1)),
            ("non-rebreather", Some(1)),
            ("nasal cannula 2L", Some(1)),
            ("NC 4 l/min", Some(1)),
            ("Venturi mask 40%", Some(1)),
            ("simple face mask", Some(1)),
            ("HFNC", Some(2)),
            ("high flow nasal cannula 60L", Some(2)),
            ("High-Flow", Some(2)),
            ("CPAP", Some(2)),
            ("BiPAP", Some(2)),
            ("non-invasive ventilation", Some(2)),
            ("NIV", Some(2)),
            ("intubated", Some(3)),
            ("mechanical ventilator", Some(3)),
            ("ETT", Some(3)),
            ("", None),
            ("banana", None),
            ("2L", None),
        ];
        for (text, want) in cases {
            assert_eq!(o2_device_class(text), want, "{text:?}");
        }
        assert!(
            O2_DEVICE_WORDS
                .iter()
                .all(|(class, _)| usize::from(*class) < O2_DEVICE_CLASSES.len())
        );
    }

    #[test]
    fn sex_codes() {
        for (text, want) in [
            ("F", Some(0.0)),
            ("female", Some(0.0)),
            (" w ", Some(0.0)),
            ("M", Some(1.0)),
            ("Male", Some(1.0)),
            ("U", None),
            ("unknown", None),
            ("X", None),
            ("", None),
            ("NA", None),
        ] {
            assert_eq!(sex_code(text), Ok(want), "{text:?}");
        }
        assert!(matches!(
            sex_code("2"),
            Err(ValueError::UnknownCode { feature: "sex", .. })
        ));
    }
}
