//! `oxbox aggregator serve` and `oxbox aggregator status`: the federation
//! aggregator and a look at its progress.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use oxbox::aggregator::{self, AggregatorConfig};

/// Arguments of `oxbox aggregator serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  \
oxbox aggregator serve --config /etc/oxbox/aggregator.toml\n\n\
The configuration (--config, an aggregator file: see config/aggregator.example.toml) names \
the listen address, the data_dir, the aggregator's key, the job (start model, rounds, \
min_sites, max_wait_s, statistics, training settings) and the enrolled sites with their \
public keys. Plain HTTP only on a loopback address; any other address needs \
tls_certificate and tls_private_key. State (SQLite, uploaded shards, published models) \
lives in data_dir: stop it with SIGINT/SIGTERM (or kill -9: nothing accepted is lost) and \
start it again with the same config to continue the job. Prints one line, `listening on \
http://ADDR` (or https), once it accepts connections; the API is at /openapi.json.")]
pub struct ServeArgs {}

/// Arguments of `oxbox aggregator status`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
oxbox aggregator status --config /etc/oxbox/aggregator.toml\n  \
oxbox aggregator status --url https://aggregator.example.org:7400 --ca aggregator-ca.pem --json\n\n\
Asks a running aggregator for GET /v1/status: the job, phase and round, the global model, \
each site (seen, last round contributed, bytes received per round) and each closed round \
(digest, contributions, seconds to aggregate). With --config the URL is the config's \
listen address (https with its certificate when TLS is configured).")]
pub struct StatusArgs {
    /// The aggregator's URL (default: from --config).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// PEM certificate(s) to trust for an https URL (default with --config:
    /// its tls_certificate).
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Print the JSON as the aggregator sent it.
    #[arg(long)]
    pub json: bool,
}

fn aggregator_config(config: Option<&Path>) -> anyhow::Result<AggregatorConfig> {
    let Some(path) = config else {
        bail!(
            "no aggregator configuration: pass --config A.toml (see config/aggregator.example.toml)"
        );
    };
    Ok(AggregatorConfig::load(path)?)
}

/// Runs `oxbox aggregator serve`.
pub fn serve(_args: ServeArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let config = aggregator_config(config)?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    aggregator::serve(config, |addr, _| {
        println!("listening on {scheme}://{addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}

/// Runs `oxbox aggregator status`.
pub fn status(args: StatusArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let (url, ca) = match (&args.url, config) {
        (Some(url), _) => (url.clone(), args.ca.clone()),
        (None, Some(_)) => {
            let c = aggregator_config(config)?;
            let mut addr = c.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            match &c.tls {
                Some((cert, _)) => (
                    format!("https://{addr}"),
                    Some(args.ca.clone().unwrap_or_else(|| cert.clone())),
                ),
                None => (format!("http://{addr}"), args.ca.clone()),
            }
        }
        (None, None) => bail!("pass --config A.toml or --url URL"),
    };
    let body = get(&url, "/v1/status", ca.as_deref())?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let status: serde_json::Value =
        serde_json::from_slice(&body).context("the aggregator's status is not JSON")?;
    print!("{}", render(&status));
    Ok(())
}

/// A human-readable status.
fn render(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}: {} round {} of {}{}",
        text(&s["job"]),
        text(&s["phase"]),
        text(&s["round"]),
        text(&s["rounds"]),
        if s["closing"].as_bool() == Some(true) {
            " (aggregating)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "global model {} (round {})",
        text(&s["global_model"]["digest"]),
        text(&s["global_model"]["round"])
    );
    let _ = writeln!(out, "sites:");
    for site in s["sites"].as_array().into_iter().flatten() {
        let bytes: Vec<String> = site["bytes_received"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| format!("r{}={}", text(&b["round"]), text(&b["bytes"])))
            .collect();
        let _ = writeln!(
            out,
            "  {:<16} seen {:<5} last round contributed {:<3} bytes {}",
            text(&site["id"]),
            text(&site["seen"]),
            text(&site["last_round_contributed"]),
            if bytes.is_empty() {
                "-".to_owned()
            } else {
                bytes.join(" ")
            }
        );
    }
    let _ = writeln!(out, "closed rounds:");
    for r in s["closed_rounds"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  round {:<3} {} sites {} aggregated in {:.3} s",
            text(&r["round"]),
            text(&r["digest"]),
            text(&r["contributions"]),
            r["aggregate_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    out
}

/// GET `path` on `base` (http or https, trusting `ca`), the 200 body.
fn get(base: &str, path: &str, ca: Option<&Path>) -> anyhow::Result<Bytes> {
    let uri: hyper::Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("{base} is not a URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("{base}: only http:// and https:// URLs"),
    };
    let host = uri.host().context("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let connector = match (https, ca) {
        (true, Some(ca)) => Some(oxbox::http::tls::connector(ca)?),
        (true, None) => bail!("an https URL needs --ca PEM (the certificate to trust)"),
        (false, _) => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let fetch = async {
            let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
                .await
                .with_context(|| format!("connecting to {base}"))?;
            let request = hyper::Request::get(uri.path())
                .header(hyper::header::HOST, format!("{host}:{port}"))
                .body(Empty::<Bytes>::new())?;
            let response = match connector {
                Some(connector) => {
                    let name = oxbox::http::tls::server_name(&host)?;
                    let tls = connector
                        .connect(name, tcp)
                        .await
                        .with_context(|| format!("TLS with {base}"))?;
                    let (mut sender, connection) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                            .await?;
                    tokio::spawn(connection);
                    sender.send_request(request).await?
                }
                None => {
                    let (mut sender, connection) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await?;
                    tokio::spawn(connection);
                    sender.send_request(request).await?
                }
            };
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                bail!(
                    "{base}{path} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(body)
        };
        tokio::time::timeout(Duration::from_secs(30), fetch)
            .await
            .map_err(|_| anyhow::anyhow!("{base} did not answer within 30 s"))?
    })
}
