//! Hostile test plugin `wasi-snoop`: Tries to read a file, an environment variable and open a socket: refused at load (filesystem, sockets).

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
            name: "wasi-snoop".into(),
            version: "0.0.1".into(),
            site: "hostile test site".into(),
            interface_version: "0.1.0".into(),
            hooks: vec![Hook::MapEmr],
        }
    }

    fn map_emr(_record: Vec<RawField>) -> Result<Vec<Feature>, PluginError> {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let home = std::env::var("HOME").unwrap_or_default();
        let socket = std::net::TcpStream::connect("127.0.0.1:22").is_ok();
        Err(PluginError {
            field: None,
            message: format!("passwd={} home={home} socket={socket}", passwd.len()),
        })
    }

    fn preprocess_image(_frame: Frame, _pixels: &Pixels) -> Result<ImageDecision, PluginError> {
        Ok(ImageDecision::KeepCanonical)
    }
}

export!(Hostile);
