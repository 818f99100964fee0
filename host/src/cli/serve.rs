//! `oxbox serve`: the local HTTP endpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use oxbox::serve::Server;

/// Arguments of `oxbox serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
oxbox serve --config config/demo.toml\n  \
curl -s -F dicom=@samples/chest-cr-sample.dcm\\;type=application/dicom \\\n       \
-F emr=@samples/example-site-record.json\\;type=application/json http://127.0.0.1:8480/v1/predict\n\n\
Routes: POST /v1/predict (multipart/form-data with a `dicom` and an `emr` part, or \
application/json {\"emr\": {...}} for EMR-only models), GET /v1/health, /v1/ready, /v1/model, \
/v1/plugins, /v1/openapi.json, /metrics, POST /v1/admin/plugins/reload. Errors are RFC 9457 \
application/problem+json. Listens on [server] listen (loopback by default; any other address \
needs [server] token_file, and clients send `Authorization: Bearer <token>`). The reload route \
needs the token everywhere, loopback included: without [server] token_file it answers 403. \
Reloads run one at a time, at most one per [server] reload_min_interval_s over HTTP, each \
recorded in the audit database. SIGHUP reloads the plugins (audited too); SIGINT/SIGTERM drain \
and exit. The log (stderr, `info` by default here; RUST_LOG overrides) names each refused \
prediction's request id, plugin and field (never a value) and each reload's plugins, old -> \
new, with versions and sha256. Prints one line, `listening on http://ADDR`, \
once it accepts connections, then, with [dicom] enabled, `dicom listening on ADDR` (the DICOM \
listener: C-ECHO / C-STORE; POST /v1/emr and GET /v1/studies/{uid}/result serve its studies).")]
pub struct Args {
    /// Model package folder; default: [model] package from the config.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Listen address, overriding [server] listen (port 0 = any free port).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
}

/// Runs `oxbox serve`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let mut loaded = super::load_config(config)?;
    if let Some(listen) = args.listen {
        loaded.config.server.listen = listen;
        loaded
            .config
            .validate()
            .map_err(|problems| anyhow::anyhow!("--listen: {}", problems.join("; ")))?;
    }
    let server = Server::new(&loaded, args.model.as_deref())?;
    let addr = server.local_addr()?;
    println!("listening on http://{addr}");
    if let Some(dicom) = server.dicom_addr() {
        println!("dicom listening on {dicom}");
    }
    std::io::stdout().flush()?;
    server.run()?;
    Ok(())
}
