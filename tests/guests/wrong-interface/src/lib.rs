//! Hostile test plugin `wrong-interface`: Built against interface 0.2.0: refused before instantiation, naming both versions.

wit_bindgen::generate!({
    path: "../wit-v0.2.0",
    world: "preprocessor",
});

use oxbox::plugin::host::{Level, log};
use oxbox::plugin::types::Hook;

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        log(Level::Debug, "describing");
        PluginInfo {
            name: "wrong-interface".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.2.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        Ok(Vec::new())
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
