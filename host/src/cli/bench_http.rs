//! `oxbox bench --url`: a load generator for a running `oxbox serve` —
//! N clients over keep-alive HTTP/1.1 connections (hyper's client), each
//! sending the same radiograph + EMR record and waiting for its answer.
//! When the server sends `Server-Timing` (`server.server_timing = true`),
//! the report also gives each stage's median and 99th percentile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use super::bench::Args;

const BOUNDARY: &str = "oxbox-bench-boundary";

fn multipart(dicom: &[u8], emr: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(dicom.len() + emr.len() + 512);
    for (name, kind, bytes) in [
        ("dicom", "application/dicom", dicom),
        ("emr", "application/json", emr),
    ] {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\nContent-Type: {kind}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// What one client measured.
#[derive(Debug, Default)]
struct Measured {
    /// Latency of each request, ms.
    latencies: Vec<f64>,
    /// Answers other than 200.
    failures: u32,
    /// Each stage's durations from the `Server-Timing` headers, ms.
    stages: BTreeMap<String, Vec<f64>>,
}

/// The stages of a `Server-Timing` header (`name;dur=ms, ...`).
fn server_timing(value: &str) -> Vec<(String, f64)> {
    value
        .split(',')
        .filter_map(|metric| {
            let mut parts = metric.split(';').map(str::trim);
            let name = parts.next()?.to_owned();
            let ms = parts
                .find_map(|p| p.strip_prefix("dur="))
                .and_then(|d| d.parse::<f64>().ok())?;
            (!name.is_empty()).then_some((name, ms))
        })
        .collect()
}

/// One client: a connection, `count` requests in turn; the latency of each.
async fn client(
    authority: String,
    body: Bytes,
    token: Option<Arc<String>>,
    count: u32,
) -> anyhow::Result<Measured> {
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut measured = Measured::default();
    for _ in 0..count {
        let mut request = Request::post("/v1/predict")
            .header(header::HOST, &authority)
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={BOUNDARY}"),
            );
        if let Some(token) = &token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(body.clone()))?;
        sender.ready().await?;
        let t = Instant::now();
        let response = sender.send_request(request).await?;
        let status = response.status();
        let timing = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(server_timing)
            .unwrap_or_default();
        let _ = response.into_body().collect().await?;
        measured.latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if status != StatusCode::OK {
            measured.failures += 1;
        }
        for (stage, ms) in timing {
            measured.stages.entry(stage).or_default().push(ms);
        }
    }
    Ok(measured)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let value = sorted[rank.clamp(1, sorted.len()) - 1];
    (value * 1000.0).round() / 1000.0
}

/// Runs the load test and prints JSON.
pub fn run(args: &Args, dicom_path: &std::path::Path) -> anyhow::Result<()> {
    let (Some(url), Some(emr)) = (&args.url, &args.emr) else {
        bail!("--url needs --emr");
    };
    let authority = url
        .strip_prefix("http://")
        .with_context(|| {
            format!("--url {url}: only http:// URLs (the box serves plain HTTP on its own host)")
        })?
        .trim_end_matches('/')
        .to_owned();
    let dicom = std::fs::read(dicom_path)
        .with_context(|| format!("cannot read {}", dicom_path.display()))?;
    let record = std::fs::read(emr).with_context(|| format!("cannot read {}", emr.display()))?;
    let token = args
        .token_file
        .as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|t| Arc::new(t.trim().to_owned()))
                .with_context(|| format!("cannot read {}", p.display()))
        })
        .transpose()?;
    let body = Bytes::from(multipart(&dicom, &record));
    let clients = args.concurrency.min(args.requests);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        // One warm-up request per client's worth of connections is not
        // needed: the server is warm after its first request; send one.
        client(authority.clone(), body.clone(), token.clone(), 1).await?;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..clients {
            let share = args.requests / clients + u32::from(i < args.requests % clients);
            tasks.push(tokio::spawn(client(
                authority.clone(),
                body.clone(),
                token.clone(),
                share,
            )));
        }
        let mut latencies = Vec::new();
        let mut failures = 0;
        let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for task in tasks {
            let m = task.await??;
            latencies.extend(m.latencies);
            failures += m.failures;
            for (stage, ms) in m.stages {
                stages.entry(stage).or_default().extend(ms);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        // Per stage, as the server timed it (Server-Timing).
        let stages: serde_json::Map<String, serde_json::Value> = stages
            .into_iter()
            .map(|(stage, mut ms)| {
                ms.sort_by(f64::total_cmp);
                let value = serde_json::json!({
                    "p50_ms": percentile(&ms, 50.0),
                    "p99_ms": percentile(&ms, 99.0),
                });
                (stage, value)
            })
            .collect();
        anyhow::Ok(serde_json::json!({
            "url": url,
            "file": dicom_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "requests": latencies.len(),
            "concurrency": clients,
            "non_200": failures,
            "min_ms": percentile(&latencies, 0.0),
            "p50_ms": percentile(&latencies, 50.0),
            "p90_ms": percentile(&latencies, 90.0),
            "p99_ms": percentile(&latencies, 99.0),
            "max_ms": percentile(&latencies, 100.0),
            "throughput_per_s": (latencies.len() as f64 / elapsed * 100.0).round() / 100.0,
            "stages": stages,
        }))
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::server_timing;

    #[test]
    fn server_timing_gives_each_stage_and_skips_what_it_cannot_read() {
        let stages =
            server_timing("parse;dur=1.5, decode;desc=\"x\";dur=2, audit, ;dur=3, inference;dur=x");
        assert_eq!(
            stages,
            vec![("parse".to_owned(), 1.5), ("decode".to_owned(), 2.0)]
        );
    }
}
