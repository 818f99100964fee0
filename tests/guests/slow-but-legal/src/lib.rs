//! Hostile test plugin `slow-but-legal`: Works for as many rounds as the record's `rounds` field says, then answers: calibrated by the test to finish just under the deadline.

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
            name: "slow-but-legal".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let rounds: u64 = record
            .iter()
            .find(|f| f.name == "rounds")
            .and_then(|f| f.value.parse().ok())
            .unwrap_or(1);
        let mut x: u64 = 1;
        for i in 0..rounds {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        Ok(vec![Feature {
            name: "age_years".into(),
            value: Some((x % 100) as f64),
        }])
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
