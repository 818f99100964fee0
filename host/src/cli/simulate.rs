//! `oxbox simulate`: a federation on loopback against local-only and
//! pooled models.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use oxbox::model::{Backbone, set_compute_threads};
use oxbox::simulate::{SimulateEvent, SimulateOptions, Variant, simulate};

/// Arguments of `oxbox simulate`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example (the CI-sized run, EMR-only, about 3 minutes on 2 cores):\n  \
oxbox synth --site-sizes 300,200,120,80,60 --no-images --seed 7 --out cohort\n  \
oxbox simulate --sites 5 --rounds 5 --data cohort --out report --emr-only\n  \
oxbox simulate --sites 5 --rounds 5 --data cohort --out report --emr-only \
--variant fedavg --variant percentile=10 --variant fedbn\n  \
oxbox synth --site-sizes 400,250,150,80,60 --site-mixes referral,general,community,vitals-only,community \
--no-images --seed 7 --out non-iid   (a non-IID cohort)\n\n\
Per variant: Ed25519 keys for the aggregator and every site, a start model (`model init`), \
aggregator.toml and one box config per site under REPORT_DIR/work/<variant>/, then \
`oxbox aggregator serve` and one `oxbox federate --exit-when-finished` per site as separate \
processes speaking HTTP on loopback, watched through GET /v1/status until the job is \
finished; the final global model is fetched over the same API. Then, in-process, each \
site's local-only model and a pooled model train for rounds x epochs (or --baseline-epochs) \
on the same training cases (each site's --holdout share is never trained on: crate::cases::is_held_out). Every \
model is scored on every site's held-out cases: per-site AUC of P(level >= 1) at 24 h and \
72 h with DeLong 95 % CI, mean AUC, generalisability (mean AUC on the other sites' test \
sets), bytes sent per site per round. Writes REPORT_DIR/report.md, report.json and bar \
charts (PNG, SVG). With --record, every byte each site sends passes a recording proxy and \
is kept under REPORT_DIR/work/<variant>/sent/<site>/ (the privacy guard reads it). A FedBN \
site's model is its own (the global model with its kept batch-norm statistics overlaid): \
scored per site on its own test cases and, for generalisability, on the other sites'."
)]
pub struct Args {
    /// Sites taking part (the cohort's first N site-* folders; default all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub sites: Option<u32>,
    /// Federated rounds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub rounds: u64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub epochs: u32,
    /// Epochs of the local-only and pooled models (default rounds ×
    /// epochs); the epoch with the best validation loss is kept.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub baseline_epochs: Option<u32>,
    /// The cohort (`oxbox synth` output).
    #[arg(long, value_name = "COHORT_DIR")]
    pub data: PathBuf,
    /// The report folder (absent or empty).
    #[arg(long, value_name = "REPORT_DIR")]
    pub out: PathBuf,
    /// Image backbone.
    #[arg(long, value_enum, default_value = "tiny")]
    pub backbone: Backbone,
    /// EMR-only models (no image branch; cohorts from `synth --no-images`).
    #[arg(long)]
    pub emr_only: bool,
    /// Side of the image input.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub input_size: u32,
    /// Cases per optimizer step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub batch_size: u32,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 0.005)]
    pub learning_rate: f64,
    /// Share of each site's cases held out for testing.
    #[arg(long, default_value_t = 0.25)]
    pub holdout: f64,
    /// Federation variant, repeatable: fedavg, percentile=P (EXAM's partial
    /// sharing of the largest P % of each tensor's change), fedbn.
    #[arg(long = "variant", default_value = "fedavg")]
    pub variants: Vec<Variant>,
    /// Seed of the start model and the baselines.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No federation: only the local-only and pooled baselines and their
    /// report (to size a cohort and settings quickly).
    #[arg(long, conflicts_with = "variants")]
    pub baselines_only: bool,
    /// Skip the federated statistics round (the start model's EMR
    /// normalisation is used instead of the federated one).
    #[arg(long)]
    pub no_statistics: bool,
    /// Keep every byte the sites send (a recording proxy per site).
    #[arg(long)]
    pub record: bool,
    /// Longest a federation job may take, seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_s: u64,
    /// Where the site plugins are built (DIR/<plugin>/plugin.toml), for the
    /// in-process baselines and evaluation.
    #[arg(long, value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
}

/// Runs `oxbox simulate`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let config = super::load_config(config)?.config;
    set_compute_threads(config.model.threads);
    let options = SimulateOptions {
        exe: std::env::current_exe()?,
        data: args.data,
        sites: args.sites.map(|s| s as usize),
        rounds: args.rounds,
        epochs: args.epochs as usize,
        baseline_epochs: args.baseline_epochs.map(|e| e as usize),
        out: args.out.clone(),
        backbone: args.backbone,
        emr_only: args.emr_only,
        input_size: args.input_size,
        batch_size: args.batch_size as usize,
        learning_rate: args.learning_rate,
        holdout: args.holdout,
        variants: if args.baselines_only {
            Vec::new()
        } else {
            args.variants
        },
        seed: args.seed,
        plugins: oxbox::dataset::PluginLookup {
            dir: args.plugins_dir,
            installed: oxbox::dataset::PluginLookup::installed_dir(),
        },
        record: args.record,
        timeout: Duration::from_secs(args.timeout_s),
        statistics: !args.no_statistics,
        site_threads: 1,
    };
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let stage = Mutex::new(String::new());
    let on_event = |event: SimulateEvent| match event {
        SimulateEvent::Stage(text) => {
            bar.println(format!("== {text}"));
            bar.set_message(text.clone());
            if let Ok(mut s) = stage.lock() {
                *s = text;
            }
        }
        SimulateEvent::Federation {
            variant,
            phase,
            round,
            rounds,
            received,
            sites,
        } => {
            let line = format!(
                "{variant}: {phase}, round {round}/{rounds}, {received}/{sites} sites sent"
            );
            bar.println(format!("   {line}"));
            bar.set_message(line);
        }
        SimulateEvent::Epoch {
            model,
            epoch,
            epochs,
        } => bar.set_message(format!("training {model}: epoch {epoch}/{epochs}")),
        SimulateEvent::Note(text) => bar.println(format!("   {text}")),
    };
    let report = simulate(&options, &config, &on_event);
    bar.finish_and_clear();
    let report = report?;
    let h24 = |model: &str| {
        report.result("24h", model).map(
            |m| serde_json::json!({"mean_auc": m.mean_auc, "generalisability": m.generalisability}),
        )
    };
    let mut models = serde_json::Map::new();
    models.insert("local-only".to_owned(), h24("local-only").into());
    for f in &report.federations {
        let name = format!("federated {}", f.variant);
        models.insert(name.clone(), h24(&name).into());
    }
    models.insert("pooled".to_owned(), h24("pooled").into());
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "report": args.out.join("report.md").display().to_string(),
            "auc_p_o2_any_24h": models,
            "targets": report.targets,
            "seconds": report.seconds,
        }))?
    );
    Ok(())
}
