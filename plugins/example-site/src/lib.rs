//! The `example-site` plugin: St Elsewhere General's emergency-department
//! export, mapped to the canonical schema, and a fix for the CR reader that
//! labels inverted images MONOCHROME2. `README.md` beside this file
//! documents the export convention; the synthetic-cohort generator writes one
//! site in exactly this convention.

wit_bindgen::generate!({
    path: "../../wit",
    world: "preprocessor",
});

use oxbox::plugin::host::{Level, log};
use oxbox::plugin::types::Hook;
use oxbox_emr_schema as schema;

struct ExampleSite;

/// How a site column maps to the canonical schema.
enum Column {
    /// Number in the given unit → this feature.
    Number(&'static str, &'static str),
    /// Sex code ("M", "F", "U", …): [`schema::sex_code`].
    Sex,
    /// "120/80" → systolic and diastolic.
    BloodPressure,
    /// Oxygen delivery device, codes or free text: [`schema::o2_device_class`].
    O2Delivery,
    /// Differential count in % of WBC → this feature.
    PercentOfWbc(&'static str),
    /// Identifiers and bookkeeping: never leave the plugin.
    Ignored,
    /// A measurement the schema (v1) has no feature for, e.g. IL-6: dropped
    /// without a word on every request (the model cannot use it; the host
    /// treats an unknown feature as a fault). See "Labs outside the schema"
    /// in plugins/README.md.
    OutsideSchema,
}

/// The site's export columns (see README.md).
fn column(name: &str) -> Option<Column> {
    Some(match name {
        "AGE" => Column::Number("age_years", "years"),
        "GENDER" => Column::Sex,
        "TEMP_F" => Column::Number("temperature_c", "°F"),
        "PULSE" => Column::Number("heart_rate_bpm", "/min"),
        "RESP" => Column::Number("resp_rate_bpm", "/min"),
        "BP" => Column::BloodPressure,
        "O2SAT" => Column::Number("spo2_pct", "%"),
        "O2_DELIVERY" => Column::O2Delivery,
        "CRP" => Column::Number("crp_mg_l", "mg/dL"),
        "DDIMER" => Column::Number("d_dimer_ng_ml_feu", "ng/mL DDU"),
        "LDH" => Column::Number("ldh_u_l", "U/L"),
        "PCT" => Column::Number("procalcitonin_ng_ml", "ng/mL"),
        "TROP_T" => Column::Number("troponin_t_ng_l", "ng/mL"),
        "WBC" => Column::Number("wbc_e9_l", "10^3/uL"),
        "LYMPH_PCT" => Column::PercentOfWbc("lymphocytes_e9_l"),
        "NEUT_PCT" => Column::PercentOfWbc("neutrophils_e9_l"),
        "CREAT" => Column::Number("creatinine_mg_dl", "umol/L"),
        "GLUC" => Column::Number("glucose_mg_dl", "mmol/L"),
        "FERRITIN" => Column::Number("ferritin_ng_ml", "ug/L"),
        "NA" => Column::Number("sodium_mmol_l", "mmol/L"),
        "MRN" | "ENCOUNTER_ID" | "PT_NAME" | "DOB" | "ARRIVAL_TS" | "ACCESSION" => Column::Ignored,
        "IL6" => Column::OutsideSchema,
        _ => return None,
    })
}

fn reject(field: &str, message: impl Into<String>) -> PluginError {
    PluginError {
        field: Some(field.to_owned()),
        message: message.into(),
    }
}

/// Builds the canonical record, one slot per schema feature.
struct Record {
    values: Vec<Option<f64>>,
}

impl Record {
    fn set(&mut self, feature: &'static str, value: f64, column: &str) -> Result<(), PluginError> {
        let index = schema::FEATURES
            .iter()
            .position(|f| f.name == feature)
            .ok_or_else(|| reject(column, format!("internal: no feature {feature}")))?;
        let checked = schema::check(&schema::FEATURES[index], value)
            .map_err(|e| reject(column, e.to_string()))?;
        self.values[index] = Some(checked);
        Ok(())
    }

    fn get(&self, feature: &str) -> Option<f64> {
        let index = schema::FEATURES.iter().position(|f| f.name == feature)?;
        self.values[index]
    }
}

fn number(column: &str, text: &str) -> Result<f64, PluginError> {
    schema::parse_number(text).map_err(|e| reject(column, e.to_string()))
}

impl Guest for ExampleSite {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "example-site".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            site: "St Elsewhere General (example site)".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr, Hook::PreprocessImage],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let mut out = Record {
            values: vec![None; schema::FEATURES.len()],
        };
        let mut percents: Vec<(&'static str, &str, f64)> = Vec::new();
        for field in &record {
            let name = field.name.trim();
            let Some(col) = column(name) else {
                // Debug, by name only: an export with extra columns is normal,
                // and a warning on every request would drown the log.
                log(Level::Debug, &format!("ignoring unknown column {name:?}"));
                continue;
            };
            let text = field.value.trim();
            if matches!(col, Column::Ignored | Column::OutsideSchema) || schema::is_missing(text) {
                continue;
            }
            match col {
                Column::Number(feature, unit) => {
                    let spec = schema::feature(feature)
                        .ok_or_else(|| reject(name, "internal: unknown feature"))?;
                    let value = schema::to_canonical(spec, number(name, text)?, Some(unit))
                        .map_err(|e| reject(name, e.to_string()))?;
                    out.set(feature, value, name)?;
                }
                Column::Sex => {
                    if let Some(sex) =
                        schema::sex_code(text).map_err(|e| reject(name, e.to_string()))?
                    {
                        out.set("sex", sex, name)?;
                    }
                }
                Column::BloodPressure => {
                    let (sys, dia) = text.split_once('/').ok_or_else(|| {
                        reject(name, format!("{text:?} is not systolic/diastolic"))
                    })?;
                    let (sys, dia) = (number(name, sys)?, number(name, dia)?);
                    if dia >= sys {
                        return Err(reject(
                            name,
                            format!("diastolic {dia} is not below systolic {sys}"),
                        ));
                    }
                    out.set("systolic_bp_mmhg", sys, name)?;
                    out.set("diastolic_bp_mmhg", dia, name)?;
                }
                Column::O2Delivery => {
                    let device = schema::o2_device_class(text).ok_or_else(|| {
                        reject(name, format!("unknown oxygen delivery device {text:?}"))
                    })?;
                    out.set("o2_device_at_triage", f64::from(device), name)?;
                }
                Column::PercentOfWbc(feature) => {
                    percents.push((feature, name, number(name, text)?))
                }
                Column::Ignored | Column::OutsideSchema => {}
            }
        }
        for (feature, name, percent) in percents {
            if !(0.0..=100.0).contains(&percent) {
                return Err(reject(name, format!("{percent} % of WBC is impossible")));
            }
            if let Some(wbc) = out.get("wbc_e9_l") {
                out.set(feature, schema::percent_of_wbc(percent, wbc), name)?;
            }
        }
        Ok(schema::FEATURES
            .iter()
            .zip(out.values)
            .map(|(spec, value)| Feature {
                name: spec.name.into(),
                value,
            })
            .collect())
    }

    fn preprocess_image(frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        // The site's CR reader writes some images with MONOCHROME2 that are
        // in fact MONOCHROME1 (minimum = white). On a correctly displayed
        // chest film the lung fields (air) are darker than the spine and
        // mediastinum between them; inverted, they are brighter.
        let attrs = &frame.attributes;
        let is_projection = matches!(attrs.modality.as_str(), "CR" | "DX");
        if !is_projection || attrs.photometric_interpretation != "MONOCHROME2" {
            return Ok(ImageDecision::KeepCanonical);
        }
        let s = frame.size as usize;
        if s < 16 || frame.canonical.len() != s * s {
            return Err(reject("canonical", "canonical image has the wrong size"));
        }
        let mean = |r0: f64, r1: f64, c0: f64, c1: f64| {
            let (r0, r1) = ((r0 * s as f64) as usize, (r1 * s as f64) as usize);
            let (c0, c1) = ((c0 * s as f64) as usize, (c1 * s as f64) as usize);
            let mut sum = 0.0f64;
            for r in r0..r1 {
                for c in c0..c1 {
                    sum += f64::from(frame.canonical[r * s + c]);
                }
            }
            sum / ((r1 - r0) * (c1 - c0)) as f64
        };
        let lungs = (mean(0.30, 0.60, 0.15, 0.35) + mean(0.30, 0.60, 0.65, 0.85)) / 2.0;
        let spine = mean(0.30, 0.60, 0.45, 0.55);
        if lungs > spine + INVERSION_MARGIN {
            log(
                Level::Warn,
                &format!(
                    "MONOCHROME2 image looks inverted (lungs {lungs:.2} brighter than spine {spine:.2}): treated as MONOCHROME1"
                ),
            );
            return Ok(ImageDecision::Replace(
                frame.canonical.iter().map(|v| 1.0 - v).collect(),
            ));
        }
        Ok(ImageDecision::KeepCanonical)
    }
}

/// How much brighter the lungs must be than the spine to call an image
/// inverted: well above the noise of a correct film, where the lungs are
/// 0.2–0.4 darker.
const INVERSION_MARGIN: f64 = 0.10;

export!(ExampleSite);

/// Runs on the build machine, no wasm needed:
/// `cargo test --manifest-path plugins/Cargo.toml -p <this crate>`.
#[cfg(test)]
mod tests {
    use super::*;

    /// One record with a value in every column `column()` maps, in the
    /// export's own units: a misspelt unit or an unknown column fails here,
    /// not on every request in production.
    const SAMPLE: &[(&str, &str)] = &[
        ("MRN", "000000"),
        ("AGE", "59"),
        ("GENDER", "F"),
        ("TEMP_F", "101,3"),
        ("PULSE", "104"),
        ("RESP", "26"),
        ("BP", "118/72"),
        ("O2SAT", "91"),
        ("O2_DELIVERY", "NC"),
        ("CRP", "8.4"),
        ("DDIMER", "650"),
        ("LDH", "410"),
        ("PCT", "0.3"),
        ("TROP_T", "0.012"),
        ("WBC", "9.2"),
        ("LYMPH_PCT", "11"),
        ("NEUT_PCT", "78"),
        ("CREAT", "97"),
        ("GLUC", "7.4"),
        ("FERRITIN", "820"),
        ("NA", "136"),
        ("IL6", "42"),
    ];

    fn sample() -> Vec<RawField> {
        SAMPLE
            .iter()
            .map(|(name, value)| RawField {
                name: (*name).into(),
                value: (*value).into(),
                unit: None,
            })
            .collect()
    }

    #[test]
    fn every_column_of_the_sample_is_known() {
        for (name, _) in SAMPLE {
            assert!(column(name).is_some(), "column {name} is not mapped");
        }
    }

    #[test]
    fn sample_record_converts_through_every_column() {
        let features = ExampleSite::map_emr(sample())
            .unwrap_or_else(|e| panic!("{:?}: {}", e.field, e.message));
        assert_eq!(features.len(), schema::FEATURES.len());
        for feature in &features {
            assert!(feature.value.is_some(), "{} not filled", feature.name);
        }
        let value = |name: &str| {
            features
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.value)
                .unwrap_or(f64::NAN)
        };
        assert!((value("temperature_c") - 38.5).abs() < 1e-9);
        assert!((value("creatinine_mg_dl") - 97.0 / 88.42).abs() < 1e-9);
        assert!((value("lymphocytes_e9_l") - 0.11 * 9.2).abs() < 1e-9);
        assert_eq!(value("o2_device_at_triage"), 1.0);
        assert_eq!(value("sex"), 0.0);
    }

    #[test]
    fn impossible_value_is_rejected_naming_the_column() {
        let mut record = sample();
        if let Some(field) = record.iter_mut().find(|f| f.name == "O2SAT") {
            field.value = "910".into();
        }
        let err = ExampleSite::map_emr(record).err().map(|e| e.field);
        assert_eq!(err, Some(Some("O2SAT".to_owned())));
    }
}
