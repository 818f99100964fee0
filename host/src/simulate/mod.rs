//! `oxbox simulate`: a whole federation on one machine, and what it is
//! worth. On a labelled multi-site cohort (`oxbox synth` output) it
//!
//! 1. starts a real federation per variant ([`federation`]): keys for the
//!    aggregator and every site, a start model, an `aggregator.toml` and one
//!    box config per site, then `oxbox aggregator serve` and one
//!    `oxbox federate` per site as separate processes, speaking HTTP on
//!    loopback, until the aggregator's `GET /v1/status` says the job has
//!    finished; the final global model is fetched over the same API;
//! 2. trains the baselines in-process with the train library
//!    ([`baselines`]): (a) every site's local-only model and (c) the pooled
//!    model on all sites' training cases, both for rounds × epochs;
//! 3. scores every model on every site's held-out test cases
//!    ([`crate::cases::is_held_out`]: no model trained on them) and computes
//!    per-site AUC with DeLong CI, mean AUC and generalisability
//!    ([`evaluation`]);
//! 4. writes `report.json`, `report.md` and bar charts ([`report`],
//!    [`charts`]).
//!
//! With `record`, every byte each site sends goes through a recording
//! proxy on loopback ([`recorder`]) and is kept for the privacy guard.
//!
//! It trusts the cohort (a folder the operator made) and the processes it
//! starts; it never puts a patient identifier in a log, an error or the
//! report (only site ids, counts and AUCs).

pub mod baselines;
pub mod charts;
pub mod evaluation;
pub mod federation;
pub mod loopback;
pub mod recorder;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::dataset;
use crate::model::Backbone;

/// Why a simulation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// Options out of range.
    #[error("{0}")]
    Options(String),
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A site folder of the cohort is unreadable.
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    /// Local-only or pooled training failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// A site's cases could not be prepared.
    #[error(transparent)]
    Cases(#[from] crate::cases::CasesError),
    /// A model package failed to load or score.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A site's kept tensors or a global model's weights are unreadable.
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
    /// A key could not be generated.
    #[error(transparent)]
    Signing(#[from] crate::signing::SigningError),
    /// Writing an output failed.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// A process of the federation failed (its log's last lines).
    #[error("{what}: {reason}")]
    Process {
        /// Which process (`aggregator`, `site-3`).
        what: String,
        /// What happened, with the tail of its log.
        reason: String,
    },
    /// A request to the aggregator failed.
    #[error("{url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The federation did not finish in time.
    #[error("the federation did not finish within {seconds} s ({state})")]
    Timeout {
        /// The limit.
        seconds: u64,
        /// Where it stood (the aggregator's phase and round).
        state: String,
    },
    /// A chart could not be drawn.
    #[error("chart {path}: {reason}")]
    Chart {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SimulateError + '_ {
    move |source| SimulateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How the sites share their updates: one federation job per variant.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Variant {
    /// Full sharing (FedAvg).
    Fedavg,
    /// EXAM's partial weight sharing: only the largest `percent` % of |Δ|
    /// per tensor (`percentile` filter).
    Percentile {
        /// Share kept, in (0, 100].
        percent: f64,
    },
    /// FedBN: batch-norm statistics stay at the sites (`exclude` filter on
    /// the `batch_norm_statistics` group).
    Fedbn,
}

impl Variant {
    /// `fedavg`, `percentile=10`, `fedbn`: the command-line spelling and the
    /// variant's name in the report.
    pub fn name(&self) -> String {
        match self {
            Variant::Fedavg => "fedavg".to_owned(),
            Variant::Percentile { percent } => format!("percentile={percent}"),
            Variant::Fedbn => "fedbn".to_owned(),
        }
    }

    /// A name usable as a folder.
    pub fn slug(&self) -> String {
        self.name().replace('=', "-")
    }

    /// The site's `[[federation.filters]]` for this variant, as TOML.
    pub fn filters_toml(&self) -> String {
        match self {
            Variant::Fedavg => String::new(),
            Variant::Percentile { percent } => {
                format!("\n[[federation.filters]]\nkind = \"percentile\"\npercent = {percent:?}\n")
            }
            Variant::Fedbn => "\n[[federation.filters]]\nkind = \"exclude\"\ngroups = [\"batch_norm_statistics\"]\n"
                .to_owned(),
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "fedavg" => Ok(Variant::Fedavg),
            "fedbn" => Ok(Variant::Fedbn),
            _ => {
                let percent = text
                    .strip_prefix("percentile=")
                    .and_then(|p| p.parse::<f64>().ok())
                    .filter(|p| *p > 0.0 && *p <= 100.0);
                percent
                    .map(|percent| Variant::Percentile { percent })
                    .ok_or_else(|| {
                        format!("{text:?}: one of fedavg, fedbn, percentile=P with P in (0, 100]")
                    })
            }
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// The oxbox binary the aggregator and the sites run as.
    pub exe: PathBuf,
    /// The cohort (`oxbox synth` output: `site-*/` folders).
    pub data: PathBuf,
    /// How many of its sites take part (the first N; `None`: all).
    pub sites: Option<usize>,
    /// Federated rounds.
    pub rounds: u64,
    /// Local epochs per round (local-only and pooled train rounds × epochs
    /// unless `baseline_epochs` says otherwise).
    pub epochs: usize,
    /// Epochs of the local-only and pooled models (`None`: rounds ×
    /// epochs, as many passes over their data as a federated site makes);
    /// the epoch with the best validation loss is kept either way.
    pub baseline_epochs: Option<usize>,
    /// The report folder (absent or empty).
    pub out: PathBuf,
    /// Image backbone of every model.
    pub backbone: Backbone,
    /// EMR-only models.
    pub emr_only: bool,
    /// Side of the image input.
    pub input_size: u32,
    /// Cases per optimizer step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// Share of each site's cases held out for testing.
    pub holdout: f64,
    /// Federation variants (one job each; none: only the local-only and
    /// pooled baselines, to size a cohort before federating).
    pub variants: Vec<Variant>,
    /// Seed of the start model and the baselines.
    pub seed: u64,
    /// Where the sites' plugins are found (in-process baselines and
    /// evaluation; the site processes use the installation's).
    pub plugins: dataset::PluginLookup,
    /// Keep every byte the sites send (`OUT/work/<variant>/sent/`).
    pub record: bool,
    /// Longest a federation job may take.
    pub timeout: Duration,
    /// Start each job with the federated statistics round (global EMR
    /// normalisation); off, the start model's normalisation is used.
    pub statistics: bool,
    /// Compute threads of each site process.
    pub site_threads: usize,
}

/// Progress, for the terminal.
#[derive(Debug, Clone)]
pub enum SimulateEvent {
    /// A stage starts.
    Stage(String),
    /// The aggregator's state changed.
    Federation {
        /// The variant.
        variant: String,
        /// `statistics`, `training`, `finished`.
        phase: String,
        /// Open round.
        round: u64,
        /// Last round.
        rounds: u64,
        /// Sites whose update of the open round is complete.
        received: usize,
        /// Sites.
        sites: usize,
    },
    /// A baseline epoch finished.
    Epoch {
        /// `local-only site-2`, `pooled`.
        model: String,
        /// Epoch.
        epoch: usize,
        /// Of.
        epochs: usize,
    },
    /// A line worth printing.
    Note(String),
}

/// One site of the simulation.
#[derive(Debug, Clone)]
pub struct SimSite {
    /// Its id.
    pub id: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Its cases.
    pub cases: usize,
    /// Cases held out for testing.
    pub test_cases: usize,
}

impl SimulateOptions {
    /// Epochs of the local-only and pooled models.
    pub fn baseline_epochs(&self) -> usize {
        self.baseline_epochs
            .unwrap_or_else(|| (self.rounds as usize).saturating_mul(self.epochs))
    }

    fn check(&self) -> Result<(), SimulateError> {
        let bad = |m: String| Err(SimulateError::Options(m));
        if self.rounds == 0 || self.epochs == 0 || self.baseline_epochs == Some(0) {
            return bad("--rounds, --epochs and --baseline-epochs must be at least 1".to_owned());
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return bad(format!(
                "--holdout {}: a share strictly between 0 and 1",
                self.holdout
            ));
        }
        if self.batch_size < 2 || !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("--batch-size must be at least 2 and --learning-rate positive".to_owned());
        }
        if self.out.exists()
            && std::fs::read_dir(&self.out)
                .map_err(io_error(&self.out))?
                .next()
                .is_some()
        {
            return bad(format!(
                "{} is not empty: choose a new --out",
                self.out.display()
            ));
        }
        Ok(())
    }
}

/// The cohort's `site-N` folders in N order, the first `limit`.
///
/// # Errors
/// [`SimulateError::Options`] when there are fewer than two (or fewer than
/// `limit`), [`SimulateError::Dataset`] for an unreadable site.
pub fn cohort_sites(
    data: &Path,
    limit: Option<usize>,
    holdout: f64,
) -> Result<Vec<SimSite>, SimulateError> {
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(data)
        .map_err(io_error(data))?
        .filter_map(Result::ok)
        .filter(|e| e.path().join("site.toml").is_file())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("site-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    dirs.sort();
    let wanted = limit.unwrap_or(dirs.len());
    if dirs.len() < wanted.max(2) {
        return Err(SimulateError::Options(format!(
            "{}: {} site folder(s) (site-N/site.toml), at least {} needed",
            data.display(),
            dirs.len(),
            wanted.max(2)
        )));
    }
    dirs.into_iter()
        .take(wanted)
        .map(|(_, dir)| {
            let site = dataset::read_site(&dir)?;
            let test = crate::cases::HeldOut::Only(holdout).select(&site);
            Ok(SimSite {
                id: site.id.clone(),
                dir,
                cases: site.cases.len(),
                test_cases: test.cases.len(),
            })
        })
        .collect()
}

/// Runs the whole simulation and writes the report into `options.out`.
///
/// # Errors
/// [`SimulateError`], naming the stage and the cause.
pub fn simulate(
    options: &SimulateOptions,
    config: &Config,
    progress: &(dyn Fn(SimulateEvent) + Sync),
) -> Result<report::SimulationReport, SimulateError> {
    options.check()?;
    let started = Instant::now();
    let sites = cohort_sites(&options.data, options.sites, options.holdout)?;
    let work = options.out.join("work");
    std::fs::create_dir_all(&work).map_err(io_error(&work))?;

    // (b) The federations, one job per variant, as separate processes.
    let mut federated = Vec::new();
    for variant in &options.variants {
        progress(SimulateEvent::Stage(format!(
            "federation ({}): aggregator and {} sites on loopback",
            variant.name(),
            sites.len()
        )));
        federated.push(federation::run(options, &sites, *variant, progress)?);
    }
    let federation_seconds = started.elapsed().as_secs_f64();

    // (a) local-only and (c) pooled, in-process.
    let baseline_started = Instant::now();
    let baselines = baselines::train_all(options, config, &sites, progress)?;
    let baseline_seconds = baseline_started.elapsed().as_secs_f64();

    // Every model on every site's test cases.
    progress(SimulateEvent::Stage(
        "evaluation on every site's held-out cases".to_owned(),
    ));
    let evaluation_started = Instant::now();
    let results = evaluation::evaluate_all(options, config, &sites, &baselines, &federated)?;
    let evaluation_seconds = evaluation_started.elapsed().as_secs_f64();

    let report = report::SimulationReport::new(
        options,
        &sites,
        &results,
        &federated,
        report::Seconds {
            federation: federation_seconds,
            baselines: baseline_seconds,
            evaluation: evaluation_seconds,
            total: started.elapsed().as_secs_f64(),
        },
    );
    report::write(&options.out, &report)?;
    charts::draw_all(&options.out, &report)?;
    Ok(report)
}
