//! Test plugin `feature-echo`: returns every field of the record as a feature of the same name and value, unchecked — so a test chooses what the host gets: a name outside EMR schema v1, a misspelt one, one given twice, a value outside the schema's range; a non-number is rejected with the value inside `field`. The host must check each (tests/sandbox, tests/e2e/plugin_schema.rs).

wit_bindgen::generate!({
    path: "../../../wit",
    world: "preprocessor",
});

use oxbox::plugin::types::Hook;

struct Echo;

impl Guest for Echo {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "feature-echo".into(),
            version: "0.0.1".into(),
            site: "test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        record
            .into_iter()
            .map(|field| {
                let text = field.value.trim();
                let value = if text.is_empty() {
                    None
                } else {
                    // A careless rejection: the value inside `field`, where
                    // the host expects only a name.
                    Some(text.parse::<f64>().map_err(|_| PluginError {
                        field: Some(format!("{}={}", field.name, field.value)),
                        message: "not a number".into(),
                    })?)
                };
                Ok(Feature {
                    name: field.name,
                    value,
                })
            })
            .collect()
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Echo);
