//! Hostile test plugin `log-forger`: tries to forge host log lines — log
//! messages and stdout/stderr with newlines, a fake log record and ANSI
//! escape codes — far more of them than the per-call cap, and one 1 MiB
//! message.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "preprocessor",
});

use oxbox::plugin::host::{Level, log};
use oxbox::plugin::types::Hook;

/// A newline, then what looks like a host log record, in red.
const FORGED: &str =
    "harmless\n2026-01-01T00:00:00.000000Z ERROR FORGED-RECORD \u{1b}[31mred\u{1b}[0m\r";

struct Hostile;

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "log-forger".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        println!("{FORGED}");
        eprintln!("{FORGED}");
        log(Level::Warn, &"HUGE".repeat(256 * 1024));
        for i in 0..200 {
            log(Level::Info, &format!("line {i} {FORGED}"));
        }
        Ok(Vec::new())
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
