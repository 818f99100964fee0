//! One federation job of the simulation, as separate processes on
//! loopback: keys (`OUT/work/keys/`), the start model, `aggregator.toml`
//! and one box config per site (`OUT/work/<variant>/`), then
//! `oxbox aggregator serve` and one `oxbox federate --exit-when-finished`
//! per site. The aggregator's `GET /v1/status` is watched until the job is
//! finished and every site has exited; the final global model is fetched
//! with `GET /v1/models/{digest}/…` and its digest checked.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::loopback;
use super::recorder::Recorder;
use super::{SimSite, SimulateError, SimulateEvent, SimulateOptions, Variant, io_error};
use crate::federation::tensors;
use crate::model::{Architecture, ModelPackage, PackageBytes, init_package};

/// The flag that makes `oxbox federate` exit once the job is finished.
pub const EXIT_WHEN_FINISHED: &str = "--exit-when-finished";
/// How often the status is polled.
const POLL: Duration = Duration::from_millis(500);
/// How long the aggregator has to answer `/healthz` after its start.
const STARTUP: Duration = Duration::from_secs(60);
/// Timeout of one request to the aggregator.
const REQUEST: Duration = Duration::from_secs(30);

/// What one federation job produced.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedRun {
    /// The variant.
    pub variant: Variant,
    /// Its name (`fedavg`, `percentile=10`, `fedbn`).
    pub name: String,
    /// The final global model's folder (fetched from the aggregator).
    pub model: PathBuf,
    /// Per site (in site order), the site's own model when its filters
    /// kept tensors at home (FedBN: the global model with the site's own
    /// batch-norm statistics overlaid, as `oxbox federate` serves and
    /// trains it); `None` for a site that keeps nothing (it uses `model`).
    pub site_models: Vec<Option<PathBuf>>,
    /// Its digest.
    pub digest: String,
    /// Rounds aggregated.
    pub rounds: u64,
    /// Bytes each site sent, per round (as the aggregator counted them).
    pub bytes: Vec<SiteBytes>,
    /// Wall time of the job, seconds.
    pub seconds: f64,
    /// Where every byte the sites sent was recorded (with `record`).
    pub recorded: Option<PathBuf>,
    /// The aggregator's last status document.
    pub status: serde_json::Value,
}

/// Bytes one site sent.
#[derive(Debug, Clone, Serialize)]
pub struct SiteBytes {
    /// Site id.
    pub site: String,
    /// Per round (1-based order; round 0 = statistics when reported).
    pub per_round: Vec<(u64, u64)>,
}

/// The architecture every model of the simulation has.
pub fn architecture(options: &SimulateOptions) -> Architecture {
    Architecture {
        emr_only: options.emr_only,
        ..crate::train::architecture(options.backbone)
    }
}

/// Kills the processes it holds when dropped (on any error path).
struct Processes(Vec<(String, Child, PathBuf)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                terminate(child);
            }
        }
    }
}

/// SIGTERM, a grace period, then SIGKILL.
fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child this process started and
        // has not reaped yet (so the pid is not reused).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn spawn(
    exe: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
    what: &str,
) -> Result<Child, SimulateError> {
    let out = std::fs::File::create(log).map_err(io_error(log))?;
    let err = out.try_clone().map_err(io_error(log))?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| SimulateError::Process {
            what: what.to_owned(),
            reason: format!("{}: {e}", exe.display()),
        })
}

/// A free loopback port (bound, read, released).
fn free_port() -> Result<SocketAddr, SimulateError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| SimulateError::Io {
        path: "127.0.0.1:0".to_owned(),
        source,
    })?;
    listener.local_addr().map_err(|source| SimulateError::Io {
        path: "127.0.0.1:0".to_owned(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), SimulateError> {
    Ok(crate::output::write_bytes(path, text.as_bytes())?)
}

/// TOML string literal (paths and ids are quoted, never spliced raw).
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn absolute(path: &Path) -> Result<PathBuf, SimulateError> {
    std::path::absolute(path).map_err(io_error(path))
}

/// The key pair of `who` under `keys/` (made once, shared by the variants):
/// (private key file, public key hex).
fn key(keys: &Path, who: &str) -> Result<(PathBuf, String), SimulateError> {
    let dir = keys.join(who);
    let private = dir.join("signing-key.pk8");
    if private.is_file() {
        let key = crate::signing::SigningKey::load(&private)?;
        return Ok((private, key.public_hex()));
    }
    Ok(crate::signing::generate_keypair(&dir)?)
}

/// The start model (a fresh init, deterministic for the seed), made once.
fn start_model(options: &SimulateOptions, work: &Path) -> Result<PathBuf, SimulateError> {
    let dir = work.join("start-model");
    if !dir.join(crate::model::package::MANIFEST_FILE).is_file() {
        init_package(
            &dir,
            "exam-federated",
            architecture(options),
            options.input_size,
            options.seed,
        )?;
    }
    absolute(&dir)
}

/// The aggregator's config.
fn aggregator_toml(
    options: &SimulateOptions,
    variant: Variant,
    listen: SocketAddr,
    dir: &Path,
    key_file: &Path,
    start: &Path,
    sites: &[(String, String)],
) -> String {
    let mut text = format!(
        "# Written by `oxbox simulate` ({variant}).\n[aggregator]\nlisten = {listen}\n\
data_dir = {data}\nkey_file = {key}\n\n[job]\nid = {job}\nstart_model = {start}\n\
rounds = {rounds}\nmin_sites = {min_sites}\nmax_wait_s = {max_wait}\nstatistics = {statistics}\n\
min_count = {min_count}\n\n[job.training]\nepochs = {epochs}\nbatch_size = {batch}\n\
learning_rate = {lr:?}\nproximal_mu = 0.0\n",
        variant = variant.name(),
        listen = quoted(&listen.to_string()),
        data = quoted(&dir.join("aggregator-data").display().to_string()),
        key = quoted(&key_file.display().to_string()),
        job = quoted(&job_id(variant)),
        start = quoted(&start.display().to_string()),
        rounds = options.rounds,
        min_sites = sites.len(),
        statistics = options.statistics,
        max_wait = options.timeout.as_secs(),
        min_count = crate::federation::stats::DEFAULT_MIN_COUNT,
        epochs = options.epochs,
        batch = options.batch_size,
        lr = options.learning_rate,
    );
    for (id, public) in sites {
        text.push_str(&format!(
            "\n[[sites]]\nid = {}\npublic_key = {}\n",
            quoted(id),
            quoted(public)
        ));
    }
    text
}

/// The federation job id of a variant.
fn job_id(variant: Variant) -> String {
    format!("simulate-{}", variant.slug())
}

/// Where a site's box stores its state in a variant's job folder.
fn site_state(variant_dir: &Path, site: &SimSite) -> PathBuf {
    variant_dir.join("sites").join(&site.id).join("state")
}

/// Site `site`'s own model: the global model in `global` with the tensors
/// the site kept at home overlaid (`federation::tensors::overlay`, the
/// same as `oxbox federate` does), written as a package into `dir`;
/// `None` when the site kept nothing.
///
/// # Errors
/// [`SimulateError`] when the kept tensors or the global package are
/// unreadable.
pub fn site_model(
    global: &Path,
    kept: &Path,
    dir: &Path,
) -> Result<Option<PathBuf>, SimulateError> {
    let bytes = match std::fs::read(kept) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(kept)(e)),
    };
    let kept = tensors::from_safetensors(&bytes, "kept tensors")?;
    let mut package = PackageBytes::read(global)?;
    let mut weights = tensors::from_safetensors(&package.weights, "global weights")?;
    if tensors::overlay(&mut weights, kept) == 0 {
        return Ok(None);
    }
    package.weights = tensors::to_safetensors(&weights)?;
    package.write(dir)?;
    Ok(Some(dir.to_path_buf()))
}

/// One site's box config.
#[allow(clippy::too_many_arguments)]
fn site_toml(
    options: &SimulateOptions,
    variant: Variant,
    site: &SimSite,
    state: &Path,
    url: &str,
    aggregator_key: &str,
    key_file: &Path,
    site_dir: &Path,
) -> String {
    format!(
        "# Written by `oxbox simulate` ({variant}).\n[site]\nid = {id}\nname = {name}\n\n\
[storage]\ndata_dir = {state}\n\n[model]\ninput_size = {input}\nthreads = {threads}\n\n\
[federation]\naggregator_url = {url}\naggregator_key = {akey}\nkey_file = {key}\n\
data = [{data}]\nholdout = {holdout:?}\npoll_interval_ms = 200\npromote = false\n{filters}",
        variant = variant.name(),
        id = quoted(&site.id),
        name = quoted(&format!("{} (simulated)", site.id)),
        state = quoted(&state.display().to_string()),
        input = options.input_size,
        threads = options.site_threads,
        url = quoted(url),
        akey = quoted(aggregator_key),
        key = quoted(&key_file.display().to_string()),
        data = quoted(&site_dir.display().to_string()),
        holdout = options.holdout,
        filters = variant.filters_toml(),
    )
}

/// The aggregator's status, as far as the simulation reads it.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    /// `statistics`, `training`, `finished`.
    pub phase: String,
    /// Open round.
    pub round: u64,
    /// Last round.
    pub rounds: u64,
    /// Current global model digest.
    pub digest: Option<String>,
    /// Sites whose update of the open round is complete.
    pub received: usize,
}

fn as_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Reads the fields of `GET /v1/status` the simulation needs, tolerating
/// the spellings `global_model: {digest, round}` or `global_model: "<digest>"`.
pub fn read_status(status: &serde_json::Value) -> StatusView {
    let global = &status["global_model"];
    let digest = global["digest"]
        .as_str()
        .or_else(|| global.as_str())
        .or_else(|| status["global_digest"].as_str())
        .or_else(|| status["global_model_digest"].as_str())
        .map(str::to_owned);
    let round = as_u64(&status["round"]).unwrap_or(0);
    let received = status["sites"].as_array().map_or(0, |sites| {
        sites
            .iter()
            .filter(|s| {
                [
                    "last_round_contributed",
                    "last_round",
                    "last_contributed_round",
                ]
                .iter()
                .find_map(|k| as_u64(&s[*k]))
                .is_some_and(|r| r >= round && round > 0)
            })
            .count()
    });
    StatusView {
        phase: status["phase"].as_str().unwrap_or("?").to_owned(),
        round,
        rounds: as_u64(&status["rounds"]).unwrap_or(0),
        digest,
        received,
    }
}

/// Bytes per site per round from the status: each site's
/// `bytes_received_per_round` (or `bytes_per_round`, `bytes`) as a map
/// round → bytes, a list of `{round, bytes}` or a list of numbers.
pub fn read_bytes(status: &serde_json::Value) -> Vec<SiteBytes> {
    let Some(sites) = status["sites"].as_array() else {
        return Vec::new();
    };
    sites
        .iter()
        .map(|s| {
            let field = [
                "bytes_received_per_round",
                "bytes_per_round",
                "bytes_received",
                "bytes",
            ]
            .iter()
            .map(|k| &s[*k])
            .find(|v| !v.is_null())
            .cloned()
            .unwrap_or_default();
            let mut per_round: Vec<(u64, u64)> = match &field {
                serde_json::Value::Object(map) => map
                    .iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, as_u64(v)?)))
                    .collect(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| match v {
                        serde_json::Value::Object(_) => {
                            Some((as_u64(&v["round"])?, as_u64(&v["bytes"])?))
                        }
                        other => Some((i as u64 + 1, as_u64(other)?)),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            per_round.sort_unstable();
            SiteBytes {
                site: s["id"].as_str().unwrap_or("?").to_owned(),
                per_round,
            }
        })
        .collect()
}

fn status(addr: SocketAddr) -> Result<serde_json::Value, SimulateError> {
    let (code, body) = loopback::get(addr, "/v1/status", REQUEST)?;
    if code != 200 {
        return Err(SimulateError::Http {
            url: format!("http://{addr}/v1/status"),
            reason: format!("status {code}"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| SimulateError::Http {
        url: format!("http://{addr}/v1/status"),
        reason: format!("not JSON: {e}"),
    })
}

/// Fetches the global model `digest` into `dir` and checks its digest.
fn fetch_model(addr: SocketAddr, digest: &str, dir: &Path) -> Result<PathBuf, SimulateError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for file in [
        crate::model::package::MANIFEST_FILE,
        crate::model::package::WEIGHTS_FILE,
    ] {
        let path = format!("/v1/models/{digest}/{file}");
        let (code, body) = loopback::get(addr, &path, REQUEST)?;
        if code != 200 {
            return Err(SimulateError::Http {
                url: format!("http://{addr}{path}"),
                reason: format!("status {code}"),
            });
        }
        crate::output::write_bytes(&dir.join(file), &body)?;
    }
    let package = ModelPackage::load(dir)?;
    if package.digest != digest {
        return Err(SimulateError::Http {
            url: format!("http://{addr}/v1/models/{digest}"),
            reason: format!("the files have digest {}", package.digest),
        });
    }
    Ok(dir.to_path_buf())
}

/// Runs one federation job to its end.
///
/// # Errors
/// [`SimulateError`]: a process that failed (with its log's tail), an
/// aggregator that does not answer, a job past `options.timeout`.
pub fn run(
    options: &SimulateOptions,
    sites: &[SimSite],
    variant: Variant,
    progress: &(dyn Fn(SimulateEvent) + Sync),
) -> Result<FederatedRun, SimulateError> {
    let work = absolute(&options.out.join("work"))?;
    let dir = work.join(variant.slug());
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let keys = work.join("keys");
    let (aggregator_key_file, aggregator_public) = key(&keys, "aggregator")?;
    let start = start_model(options, &work)?;
    let enrolled: Vec<(String, String)> = sites
        .iter()
        .map(|s| key(&keys, &s.id).map(|(_, public)| (s.id.clone(), public)))
        .collect::<Result<_, _>>()?;
    let listen = free_port()?;
    let config = dir.join("aggregator.toml");
    write(
        &config,
        &aggregator_toml(
            options,
            variant,
            listen,
            &dir,
            &aggregator_key_file,
            &start,
            &enrolled,
        ),
    )?;

    let started = Instant::now();
    let mut processes = Processes(Vec::new());
    let log = dir.join("aggregator.log");
    let child = spawn(
        &options.exe,
        &[
            "aggregator".as_ref(),
            "serve".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        &log,
        "aggregator",
    )?;
    processes
        .0
        .push(("aggregator".to_owned(), child, log.clone()));
    wait_healthy(listen, &mut processes)?;

    // One recording proxy per site, when asked.
    let recorded = options.record.then(|| dir.join("sent"));
    let mut recorders = Vec::new();
    for site in sites {
        let site_dir = dir.join("sites").join(&site.id);
        std::fs::create_dir_all(&site_dir).map_err(io_error(&site_dir))?;
        let url = match &recorded {
            Some(sent) => {
                let recorder = Recorder::start(listen, &sent.join(&site.id))?;
                let url = format!("http://{}", recorder.addr());
                recorders.push(recorder);
                url
            }
            None => format!("http://{listen}"),
        };
        let site_config = site_dir.join("oxbox.toml");
        write(
            &site_config,
            &site_toml(
                options,
                variant,
                site,
                &site_state(&dir, site),
                &url,
                &aggregator_public,
                &keys.join(&site.id).join("signing-key.pk8"),
                &absolute(&site.dir)?,
            ),
        )?;
        let log = site_dir.join("federate.log");
        let child = spawn(
            &options.exe,
            &[
                "--config".as_ref(),
                site_config.as_os_str(),
                "federate".as_ref(),
                EXIT_WHEN_FINISHED.as_ref(),
            ],
            &log,
            &site.id,
        )?;
        processes.0.push((site.id.clone(), child, log));
    }

    // Watch until finished and every site has exited.
    let mut last = StatusView::default();
    let mut last_status = serde_json::Value::Null;
    loop {
        if started.elapsed() > options.timeout {
            return Err(SimulateError::Timeout {
                seconds: options.timeout.as_secs(),
                state: format!("phase {}, round {}/{}", last.phase, last.round, last.rounds),
            });
        }
        let mut running = 0;
        for (what, child, log) in &mut processes.0 {
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(code)) if code.success() && what != "aggregator" => {}
                Ok(Some(code)) => {
                    return Err(SimulateError::Process {
                        what: what.clone(),
                        reason: format!("exited with {code}; its log ends:\n{}", tail(log, 15)),
                    });
                }
                Err(e) => {
                    return Err(SimulateError::Process {
                        what: what.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        if let Ok(now) = status(listen) {
            let view = read_status(&now);
            if view.phase != last.phase
                || view.round != last.round
                || view.received != last.received
            {
                progress(SimulateEvent::Federation {
                    variant: variant.name(),
                    phase: view.phase.clone(),
                    round: view.round,
                    rounds: view.rounds,
                    received: view.received,
                    sites: sites.len(),
                });
            }
            last = view;
            last_status = now;
        }
        // Only the aggregator left, and it says finished.
        if running == 1 && last.phase == "finished" {
            break;
        }
        std::thread::sleep(POLL);
    }
    let seconds = started.elapsed().as_secs_f64();
    let digest = last.digest.clone().ok_or_else(|| SimulateError::Http {
        url: format!("http://{listen}/v1/status"),
        reason: "no global model digest in the status".to_owned(),
    })?;
    let model = fetch_model(listen, &digest, &dir.join("global-model"))?;
    drop(processes);
    let site_models = sites
        .iter()
        .map(|site| {
            let kept = crate::federation::site::kept_tensors_path(
                &site_state(&dir, site),
                &job_id(variant),
            );
            site_model(&model, &kept, &dir.join("site-models").join(&site.id))
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop(recorders);
    progress(SimulateEvent::Note(format!(
        "federation ({}) finished in {seconds:.0} s: global model {}",
        variant.name(),
        &digest[..digest.len().min(12)]
    )));
    Ok(FederatedRun {
        variant,
        name: variant.name(),
        model,
        site_models,
        digest,
        rounds: last.rounds,
        bytes: read_bytes(&last_status),
        seconds,
        recorded,
        status: last_status,
    })
}

/// Waits for `/healthz`, failing early when the aggregator exits.
fn wait_healthy(addr: SocketAddr, processes: &mut Processes) -> Result<(), SimulateError> {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = loopback::get(addr, "/healthz", Duration::from_secs(2)) {
            return Ok(());
        }
        if let Some((what, child, log)) = processes.0.first_mut()
            && let Ok(Some(code)) = child.try_wait()
        {
            return Err(SimulateError::Process {
                what: what.clone(),
                reason: format!("exited with {code}; its log ends:\n{}", tail(log, 15)),
            });
        }
        if started.elapsed() > STARTUP {
            return Err(SimulateError::Process {
                what: "aggregator".to_owned(),
                reason: format!("no answer on http://{addr}/healthz within {STARTUP:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_both_spellings_of_the_global_model_and_the_bytes() {
        let a = serde_json::json!({
            "phase": "training", "round": 2, "rounds": 5,
            "global_model": {"digest": "abc", "round": 1},
            "sites": [
                {"id": "site-1", "last_round_contributed": 2, "bytes_received_per_round": {"1": 10, "2": 20}},
                {"id": "site-2", "last_round_contributed": 1, "bytes_per_round": [{"round": 1, "bytes": 7}]}
            ]
        });
        let view = read_status(&a);
        assert_eq!(
            (view.phase.as_str(), view.round, view.rounds),
            ("training", 2, 5)
        );
        assert_eq!(view.digest.as_deref(), Some("abc"));
        assert_eq!(view.received, 1);
        let bytes = read_bytes(&a);
        assert_eq!(bytes[0].per_round, vec![(1, 10), (2, 20)]);
        assert_eq!(bytes[1].per_round, vec![(1, 7)]);
        let b = serde_json::json!({"phase": "finished", "global_model": "def"});
        assert_eq!(read_status(&b).digest.as_deref(), Some("def"));
    }

    #[test]
    fn a_fedbn_site_model_is_the_global_with_the_sites_own_batch_norm_statistics() {
        use crate::model::{Backbone, Model, ParameterGroup};
        let dir = tempfile::tempdir().expect("tempdir");
        let architecture = Architecture {
            emr_only: false,
            ..crate::train::architecture(Backbone::Tiny)
        };
        let global = dir.path().join("global");
        init_package(&global, "fedbn", architecture, 32, 5).expect("init");
        let global_weights = tensors::from_safetensors(
            &PackageBytes::read(&global).expect("read").weights,
            "global",
        )
        .expect("weights");
        // What a FedBN site keeps: its own running statistics.
        let kept: tensors::Tensors = global_weights
            .iter()
            .filter(|(name, _)| {
                ParameterGroup::of(name) == Some(ParameterGroup::BatchNormStatistics)
            })
            .map(|(name, t)| {
                let mut own = t.clone();
                let var = name.ends_with("running_var");
                for v in &mut own.values {
                    *v = if var { *v * 3.0 } else { *v + 0.7 };
                }
                (name.clone(), own)
            })
            .collect();
        assert!(!kept.is_empty(), "a tiny backbone has batch norms");
        let kept_file = dir.path().join("kept.safetensors");
        std::fs::write(&kept_file, tensors::to_safetensors(&kept).expect("encode")).expect("write");

        let own = site_model(&global, &kept_file, &dir.path().join("site-1"))
            .expect("site model")
            .expect("the site kept tensors");
        let own_weights =
            tensors::from_safetensors(&PackageBytes::read(&own).expect("read").weights, "own")
                .expect("weights");
        for (name, tensor) in &own_weights {
            let want = kept.get(name).unwrap_or(&global_weights[name]);
            assert_eq!(tensor, want, "{name}");
        }
        // Same input, other predictions: the overlay is what is scored.
        let image: Vec<f32> = (0..32 * 32)
            .map(|i| ((i * 37) % 101) as f32 / 101.0)
            .collect();
        let features = vec![("spo2_pct".to_owned(), Some(91.0))];
        let predict = |dir: &Path| {
            let model = Model::load(
                ModelPackage::load(dir).expect("package"),
                &candle_core::Device::Cpu,
            )
            .expect("load");
            model
                .predict(Some(image.as_slice()), &features)
                .expect("predict")
                .h24
                .p_o2_any
        };
        let (bare, overlaid) = (predict(&global), predict(&own));
        assert!(
            (bare - overlaid).abs() > 1e-4,
            "the site's own statistics change its prediction: {bare} vs {overlaid}"
        );
        // A site that kept nothing uses the bare global model.
        let none = site_model(
            &global,
            &dir.path().join("absent"),
            &dir.path().join("site-2"),
        )
        .expect("no kept file");
        assert!(none.is_none());
    }

    #[test]
    fn configs_quote_paths_and_carry_the_variant_filters() {
        for path in ["a\"b", "c:\\x", "it's", "new\nline"] {
            let doc: toml::Table = toml::from_str(&format!("p = {}", quoted(path))).expect("toml");
            assert_eq!(doc["p"].as_str(), Some(path), "{path:?} survives quoting");
        }
        let percent: Variant = "percentile=10".parse().expect("variant");
        assert!(percent.filters_toml().contains("percent = 10.0"));
        let fedbn: Variant = "fedbn".parse().expect("variant");
        assert!(fedbn.filters_toml().contains("batch_norm_statistics"));
        assert!("percentile=0".parse::<Variant>().is_err());
        assert!("fedsgd".parse::<Variant>().is_err());
    }
}
