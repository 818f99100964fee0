//! Test plugin `pixel-reader`: reads every row of the frame through the
//! `pixels` resource (and one read far out of bounds), and reports what it
//! saw as its rejection message, for the host to check.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "preprocessor",
});

use oxbox::plugin::types::Hook;

struct Reader;

impl Guest for Reader {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "pixel-reader".into(),
            version: "0.0.1".into(),
            site: "test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::PreprocessImage],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        Ok(Vec::new())
    }

    fn preprocess_image(frame: Frame, pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        let mut sum = 0f64;
        let mut count = 0u64;
        let mut row = 0;
        while row < frame.rows {
            let chunk = pixels.read_rows(row, 1024);
            count += chunk.len() as u64;
            sum += chunk.iter().map(|&v| f64::from(v)).sum::<f64>();
            row += 1024;
        }
        let out_of_bounds = pixels.read_rows(u32::MAX, u32::MAX).len();
        Err(PluginError {
            field: None,
            message: format!("count={count} sum={sum} oob={out_of_bounds}"),
        })
    }
}

export!(Reader);
