//! Hostile test plugin `infinite-loop`: An infinite loop in map-emr: the deadline must stop it.

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
            name: "infinite-loop".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
