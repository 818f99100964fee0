//! `oxbox bench --url`: a load generator for a running `oxbox serve` —
//! N clients over keep-alive HTTP/1.1 connections (hyper's client), each
//! sending the same radiograph + EMR record and waiting for its answer.

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

/// One client: a connection, `count` requests in turn; the latency of each.
async fn client(
    authority: String,
    body: Bytes,
    token: Option<Arc<String>>,
    count: u32,
) -> anyhow::Result<(Vec<f64>, u32)> {
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut latencies = Vec::with_capacity(count as usize);
    let mut failures = 0;
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
        let _ = response.into_body().collect().await?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if status != StatusCode::OK {
            failures += 1;
        }
    }
    Ok((latencies, failures))
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
        for task in tasks {
            let (l, f) = task.await??;
            latencies.extend(l);
            failures += f;
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        anyhow::Ok(serde_json::json!({
            "url": url,
            "file": dicom_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "requests": latencies.len(),
            "concurrency": clients,
            "non_200": failures,
            "p50_ms": percentile(&latencies, 50.0),
            "p99_ms": percentile(&latencies, 99.0),
            "max_ms": percentile(&latencies, 100.0),
            "throughput_per_s": (latencies.len() as f64 / elapsed * 100.0).round() / 100.0,
        }))
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
