//! `oxbox bench federation-round`: the overhead of one federated round
//! without training. The real aggregator binary on loopback; N simulated
//! sites in this process, each taking a random Δ of the real model
//! through the site's way to the wire (filters → shards → sign → upload);
//! timed until the aggregator has verified, aggregated and published the
//! new global model. The aggregator's peak RSS is read from outside
//! (`VmHWM` in /proc/<pid>/status).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use oxbox::federation::client::AggregatorClient;
use oxbox::federation::filters::Filter;
use oxbox::federation::protocol::{Phase, RoundTask};
use oxbox::federation::site::{SystemNormal, UpdateHeader, build_update};
use oxbox::federation::tensors::{self, Tensors};
use oxbox::model::Backbone;
use oxbox::model::package::PackageBytes;
use oxbox::signing::{SigningKey, generate_keypair};

/// Arguments of `oxbox bench federation-round`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  oxbox bench federation-round --sites 20 --backbone resnet18\n  \
oxbox bench federation-round --sites 20 --backbone resnet18 --percentile 10\n\n\
Starts `oxbox aggregator serve` (this binary) on a loopback port with a fresh job of one \
round, no statistics phase, from a freshly initialised package of --backbone; then --sites \
simulated sites in this process (--site-threads at once, default twice the cores) each filter, shard, \
sign and upload a random Δ of that model. Prints JSON: the round's wall time from the first \
site's filter to the aggregator's published global model (filter, shard, sign, upload, \
verify, aggregate, publish; no training), the upload and aggregation parts, bytes and shards \
per site, and the aggregator's peak RSS (VmHWM of its process)."
)]
pub struct Args {
    /// Simulated sites.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub sites: u32,
    /// Backbone of the model (tiny, resnet18, resnet34).
    #[arg(long, default_value = "resnet18")]
    pub backbone: Backbone,
    /// Side of the model's image input (does not change the parameter count).
    #[arg(long, default_value_t = 224)]
    pub input_size: u32,
    /// Share only the largest P % of |Δ| per tensor (partial sharing).
    #[arg(long, value_name = "P")]
    pub percentile: Option<f64>,
    /// Largest shard.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub shard_mib: u64,
    /// Simulated sites at work at once (each builds its update, then
    /// uploads it over its own connection); default: twice the cores, so
    /// that one site's upload overlaps another's filter, shard and sign.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub site_threads: Option<u32>,
    /// Seconds to wait for the aggregator to publish the round.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// The aggregator process, killed on drop.
struct Aggregator(Child);

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident set size of process `pid`, bytes (Linux).
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn free_loopback_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes the aggregator's config for a one-round job of `sites`.
fn write_aggregator_config(
    dir: &Path,
    port: u16,
    key_file: &Path,
    start_model: &Path,
    sites: &[(String, String)],
) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        "[aggregator]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {data:?}\nkey_file = {key:?}\n\
         max_upload_mib_per_site_round = 4096\n\n[job]\nid = \"bench\"\nstart_model = {start:?}\n\
         rounds = 1\nmin_sites = {n}\nmax_wait_s = 3600\nstatistics = false\n\n[job.training]\n\
         epochs = 1\nbatch_size = 16\nlearning_rate = 0.001\nproximal_mu = 0.0\n",
        data = dir.join("aggregator-data").display().to_string(),
        key = key_file.display().to_string(),
        start = start_model.display().to_string(),
        n = sites.len(),
    );
    for (id, key) in sites {
        text.push_str(&format!("\n[[sites]]\nid = {id:?}\npublic_key = {key:?}\n"));
    }
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The verified task.
fn task(client: &AggregatorClient, aggregator_key: &[u8; 32]) -> anyhow::Result<RoundTask> {
    Ok(client.task()?.verify(&[*aggregator_key], "round task")?)
}

/// Runs `oxbox bench federation-round`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(p) = args.percentile
        && !(p > 0.0 && p <= 100.0)
    {
        bail!("--percentile must be in (0, 100]");
    }
    let scratch = tempfile::tempdir().context("scratch folder")?;
    let dir = scratch.path();

    // Keys, start model, the aggregator's config.
    let (aggregator_key_file, aggregator_public) = generate_keypair(&dir.join("aggregator"))?;
    let aggregator_key = oxbox::signing::parse_public_key(&aggregator_public)?;
    let mut sites = Vec::new();
    for i in 1..=args.sites {
        let (key_file, public) = generate_keypair(&dir.join(format!("site-{i}")))?;
        sites.push((format!("site-{i}"), public, SigningKey::load(&key_file)?));
    }
    let start = dir.join("start-model");
    let architecture = oxbox::train::architecture(args.backbone);
    oxbox::model::init_package(&start, "bench", architecture, args.input_size, 1)?;
    let port = free_loopback_port()?;
    let config = write_aggregator_config(
        dir,
        port,
        &aggregator_key_file,
        &start,
        &sites
            .iter()
            .map(|(id, public, _)| (id.clone(), public.clone()))
            .collect::<Vec<_>>(),
    )?;

    // The real aggregator binary.
    let log = std::fs::File::create(dir.join("aggregator.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["aggregator", "serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting `oxbox aggregator serve`")?;
    let aggregator = Aggregator(child);
    let pid = aggregator.0.id();
    let url = format!("http://127.0.0.1:{port}");
    let client = AggregatorClient::new(&url, None, Duration::from_secs(args.timeout_s))?;
    let ready = Instant::now();
    let first = loop {
        match task(&client, &aggregator_key) {
            Ok(task) if task.phase == Phase::Training => break task,
            Ok(_) | Err(_) if ready.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(task) => bail!("the aggregator's job is in phase {:?}", task.phase),
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("aggregator.log")).unwrap_or_default();
                bail!("the aggregator did not answer within 60 s: {e}\n{log}");
            }
        }
    };

    // The global model's weights (checked against the signed digest) and
    // one random Δ; each site sends it scaled by its own factor.
    let global = PackageBytes {
        manifest: client.model_file(&first.global_model, "model.toml", 1 << 20)?,
        weights: client.model_file(&first.global_model, "weights.safetensors", 4 << 30)?,
    };
    if global.digest() != first.global_model {
        bail!("the global model's files do not match the signed digest");
    }
    let weights = tensors::from_safetensors(&global.weights, "global weights")?;
    let parameters: usize = weights.values().map(|t| t.values.len()).sum();
    let mut rng = oxbox::rng::Pcg::new(7, 11);
    let base: Tensors = weights
        .iter()
        .map(|(name, t)| {
            let values = t
                .values
                .iter()
                .map(|_| (rng.normal() * 1e-3) as f32)
                .collect();
            (
                name.clone(),
                tensors::Tensor32 {
                    shape: t.shape.clone(),
                    values,
                },
            )
        })
        .collect();
    drop(weights);
    let filters: Vec<Filter> = args
        .percentile
        .map(|percent| Filter::Percentile { percent })
        .into_iter()
        .collect();

    // The round: sites in parallel (--site-threads at once), then wait for the
    // published global model.
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let workers = args
        .site_threads
        .map_or(2 * cores, |n| n as usize)
        .min(sites.len());
    let next = AtomicUsize::new(0);
    let sent: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for _ in 0..workers {
            handles.push(scope.spawn(|| -> anyhow::Result<()> {
                let client =
                    AggregatorClient::new(&url, None, Duration::from_secs(args.timeout_s))?;
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((id, _, key)) = sites.get(i) else {
                        return Ok(());
                    };
                    let scale = 1.0 + i as f32 * 0.01;
                    let delta: Tensors = base
                        .iter()
                        .map(|(name, t)| {
                            (
                                name.clone(),
                                tensors::Tensor32 {
                                    shape: t.shape.clone(),
                                    values: t.values.iter().map(|v| v * scale).collect(),
                                },
                            )
                        })
                        .collect();
                    let update = build_update(
                        UpdateHeader {
                            job: &first.job,
                            round: first.round,
                            site: id,
                            base_model: &first.global_model,
                            samples: 100 + i as u64,
                        },
                        delta,
                        &filters,
                        (args.shard_mib as usize) << 20,
                        key,
                        &mut SystemNormal::new(),
                    )?;
                    let missing = client.send_manifest(&update.document)?;
                    let mut bytes = 0u64;
                    for shard in update.shards {
                        let info = &update.manifest.shards[shard.index as usize];
                        if missing.contains(&info.sha256) {
                            bytes += info.bytes;
                            client.put_shard(&info.sha256, Bytes::from(shard.bytes))?;
                        }
                    }
                    if let Ok(mut sent) = sent.lock() {
                        sent.push((bytes, update.manifest.shards.len()));
                    }
                }
            }));
        }
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a site thread panicked"))??;
        }
        Ok(())
    })?;
    let uploaded = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let published = loop {
        let task = task(&client, &aggregator_key)?;
        if task.global_round >= 1 {
            break task;
        }
        if Instant::now() > deadline {
            bail!(
                "the aggregator did not publish the round within {} s",
                args.timeout_s
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let round = started.elapsed();
    let peak = vm_hwm(pid);
    drop(aggregator);
    let sent = sent.into_inner().unwrap_or_default();
    let bytes: Vec<u64> = sent.iter().map(|(b, _)| *b).collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "sites": args.sites,
            "backbone": args.backbone,
            "parameters": parameters,
            "percentile": args.percentile,
            "shard_mib": args.shard_mib,
            "site_threads": workers,
            "round_seconds": round.as_secs_f64(),
            "upload_seconds": uploaded.as_secs_f64(),
            "aggregate_and_publish_seconds": (round - uploaded).as_secs_f64(),
            "bytes_per_site": bytes.iter().sum::<u64>() / bytes.len().max(1) as u64,
            "shards_per_site": sent.first().map(|(_, n)| *n),
            "aggregator_peak_rss_mib": peak.map(|b| b as f64 / (1u64 << 20) as f64),
            "global_model": published.global_model,
        }))?
    );
    Ok(())
}
