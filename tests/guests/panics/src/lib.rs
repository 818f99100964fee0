//! Hostile test plugin `panics`: Panics: a trap, reported with the plugin's name.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "preprocessor",
});

use oxbox::plugin::host::{Level, log};
use oxbox::plugin::types::Hook;

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        log(Level::Debug, "describing");
        PluginInfo {
            name: "panics".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        panic!(
            "hostile plugin panics on a record of {} fields",
            record.len()
        );
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
