//! Hostile test plugin `random-probe`: asks `wasi:random` for as many bytes
//! as the record's `bytes` field says (64 MiB, say) and reports how many it
//! got and the first ones, for the host to check the bound and that two
//! runs see the same bytes.

wit_bindgen::generate!({
    inline: r#"
        package hostile:random-probe;

        world probe {
            include oxbox:plugin/preprocessor@0.1.0;
            import wasi:random/random@0.2.0;
        }
    "#,
    path: ["../../../wit", "wit"],
    world: "hostile:random-probe/probe",
    generate_all,
});

use oxbox::plugin::types::Hook;

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "random-probe".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let len: u64 = record
            .iter()
            .find(|f| f.name == "bytes")
            .and_then(|f| f.value.parse().ok())
            .unwrap_or(16);
        let bytes = wasi::random::random::get_random_bytes(len);
        let head: String = bytes.iter().take(32).map(|b| format!("{b:02x}")).collect();
        // std's own randomness (hash seeds) goes through the same generator.
        let state = std::collections::hash_map::RandomState::new();
        let hashed = std::hash::BuildHasher::hash_one(&state, 42u32);
        Err(PluginError {
            field: None,
            message: format!("len={} head={head} hash={hashed:016x}", bytes.len()),
        })
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
