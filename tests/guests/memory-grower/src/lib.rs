//! Hostile test plugin `memory-grower`: Grows its memory without bound: the memory cap must stop it.

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
            name: "memory-grower".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            chunk[0] = hoard.len() as u8;
            hoard.push(std::hint::black_box(chunk));
        }
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
