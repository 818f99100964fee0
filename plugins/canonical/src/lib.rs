//! The `canonical` plugin: for sites whose export already uses the canonical
//! schema's field names. It normalises the common alternative units (°F,
//! creatinine µmol/L, glucose mmol/L, CRP mg/dL, D-dimer DDU, differential
//! counts as % of WBC, …) and range-checks every value: a physiologically
//! impossible value is rejected, naming the field and the value.

wit_bindgen::generate!({
    path: "../../wit",
    world: "preprocessor",
});

use oxbox::plugin::host::{Level, log};
use oxbox::plugin::types::Hook;
use oxbox_emr_schema as schema;

struct Canonical;

fn reject(field: &str, message: impl Into<String>) -> PluginError {
    PluginError {
        field: Some(field.to_owned()),
        message: message.into(),
    }
}

impl Guest for Canonical {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "canonical".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            site: "any site exporting the canonical schema".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let mut values: Vec<Option<f64>> = vec![None; schema::FEATURES.len()];
        let mut seen = vec![false; schema::FEATURES.len()];
        // Differential counts in % of WBC wait for the WBC count.
        let mut percent_of_wbc: Vec<(usize, f64)> = Vec::new();
        for field in &record {
            let name = field.name.trim();
            let index = schema::FEATURES
                .iter()
                .position(|f| f.name.eq_ignore_ascii_case(name))
                .ok_or_else(|| reject(name, format!("{name:?} is not a canonical field")))?;
            if std::mem::replace(&mut seen[index], true) {
                return Err(reject(name, "given twice"));
            }
            let spec = &schema::FEATURES[index];
            if schema::is_missing(&field.value) {
                continue;
            }
            let raw =
                schema::parse_number(&field.value).map_err(|e| reject(name, e.to_string()))?;
            let unit = field.unit.as_deref();
            if matches!(spec.name, "lymphocytes_e9_l" | "neutrophils_e9_l")
                && schema::is_percent_of_wbc(unit)
            {
                percent_of_wbc.push((index, raw));
                continue;
            }
            let value =
                schema::to_canonical(spec, raw, unit).map_err(|e| reject(name, e.to_string()))?;
            values[index] =
                Some(schema::check(spec, value).map_err(|e| reject(name, e.to_string()))?);
        }
        let wbc_index = schema::FEATURES
            .iter()
            .position(|f| f.name == "wbc_e9_l")
            .unwrap_or(0);
        for (index, percent) in percent_of_wbc {
            let spec = &schema::FEATURES[index];
            if !(0.0..=100.0).contains(&percent) {
                return Err(reject(
                    spec.name,
                    format!("{percent} % of WBC is impossible"),
                ));
            }
            match values[wbc_index] {
                Some(wbc) => {
                    let value = schema::percent_of_wbc(percent, wbc);
                    values[index] = Some(
                        schema::check(spec, value).map_err(|e| reject(spec.name, e.to_string()))?,
                    );
                }
                None => log(
                    Level::Warn,
                    &format!(
                        "{} given as % of WBC without a WBC count: treated as missing",
                        spec.name
                    ),
                ),
            }
        }
        Ok(schema::FEATURES
            .iter()
            .zip(values)
            .map(|(spec, value)| Feature {
                name: spec.name.into(),
                value,
            })
            .collect())
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Canonical);
