//! Hostile test plugin `sleeper`: sleeps 20 s (a WASI monotonic-clock
//! pollable) in `map-emr` and in `preprocess-image`, then answers. The
//! sandbox's clock pollables are ready at once, so the sleeps return
//! immediately and the calls finish well within the deadline.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "preprocessor",
});

use oxbox::plugin::types::Hook;
use std::time::Duration;

const NAP: Duration = Duration::from_secs(20);

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "sleeper".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr, Hook::PreprocessImage],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        std::thread::sleep(NAP);
        Ok(Vec::new())
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        std::thread::sleep(NAP);
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
