//! Hostile test plugin `deep-recursion`: Recurses without end: the stack limit must stop it.

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
            name: "deep-recursion".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        fn dive(depth: u64, pad: [u64; 8]) -> u64 {
            std::hint::black_box(pad);
            dive(depth + 1, [depth; 8]) + 1
        }
        let depth = dive(record.len() as u64, [0; 8]);
        Ok(vec![Feature {
            name: "age_years".into(),
            value: Some(depth as f64),
        }])
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
