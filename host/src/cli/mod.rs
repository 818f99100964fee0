//! Command-line interface: one file per subcommand, each with worked
//! examples in its help. Errors are `anyhow` here and only here.

mod aggregator;
mod audit;
mod bench;
mod bench_federation;
mod bench_http;
mod config_check;
mod dicom_info;
mod evaluate;
mod federate;
mod keys;
mod model;
mod plugin;
mod predict;
mod preprocess;
mod serve;
mod simulate;
mod synth;
mod train;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use oxbox::config::{ConfigError, LoadedConfig};
use oxbox::dicom::DicomError;
use oxbox::plugins::PluginError;
use oxbox::plugins::record::RecordError;

/// Exit status for bad input or usage (clap uses it for usage errors too).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for any other failure.
pub const EXIT_FAILURE: u8 = 1;

/// oxbox — the radiology edge box for federated oxygen-need prediction.
#[derive(Debug, Parser)]
#[command(
    name = "oxbox",
    version,
    about,
    long_about = "oxbox turns a chest radiograph (DICOM) and emergency-room vital signs and labs \
into oxygen-need predictions, runs site plugins in a WebAssembly sandbox, and takes part in \
federated training without patient data leaving the hospital.",
    after_help = "Exit status: 0 success, 1 failure, 2 bad input or usage.\n\
Examples:\n  oxbox preprocess --dicom chest.dcm --out chest.npy --png chest.png\n  \
oxbox dicom info chest.dcm\n  oxbox config check --config /etc/oxbox/oxbox.toml"
)]
pub struct Cli {
    /// Configuration file; without it, the embedded default (config/oxbox.toml).
    #[arg(long, global = true, env = "OXBOX_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Turn a chest radiograph into the model-ready tensor (canonical preprocessing v1).
    Preprocess(preprocess::Args),
    /// Predict oxygen need for one case: radiograph + EMR record.
    Predict(predict::Args),
    /// Serve predictions over HTTP (hyper): /v1/predict, health, metrics.
    Serve(serve::Args),
    /// Generate a multi-site synthetic cohort with known truth.
    Synth(synth::Args),
    /// Train a model on labelled site folders, through each site's plugin.
    Train(train::Args),
    /// Evaluate a model on labelled site folders: AUC with CI, calibration, ROC.
    Evaluate(evaluate::Args),
    /// Take part in a federated training job as a site (polls the aggregator).
    Federate(federate::Args),
    /// Simulate a federation on loopback and compare it with local-only and pooled models.
    Simulate(simulate::Args),
    /// Inspect DICOM files.
    #[command(subcommand)]
    Dicom(DicomCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure decode + preprocess speed on one file.
    Bench(bench::Args),
    /// Check, run, pack, sign and benchmark site plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Inspect and create model packages.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Read the audit log of predictions.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The federation aggregator: serve a job, or show its status.
    #[command(subcommand)]
    Aggregator(AggregatorCommand),
}

/// `oxbox aggregator …`
#[derive(Debug, Subcommand)]
pub enum AggregatorCommand {
    /// Run the aggregator of a federation job (--config A.toml).
    Serve(aggregator::ServeArgs),
    /// Print a running aggregator's status: rounds, sites, bytes.
    Status(aggregator::StatusArgs),
}

/// `oxbox audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the last N audit records.
    Tail(audit::TailArgs),
}

/// `oxbox model …`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Show a model package: architecture, EMR schema, digest, size.
    Info(model::InfoArgs),
    /// Write a deterministic randomly initialised package (untrained).
    Init(model::InitArgs),
}

/// `oxbox plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Check a plugin: interface version, imports, hooks, sha256, signature.
    Check(plugin::CheckArgs),
    /// Run one plugin on one case (EMR record, optionally a radiograph).
    Run(plugin::RunArgs),
    /// Package a built component with its manifest, ready to deploy and sign.
    Pack(plugin::PackArgs),
    /// Sign a plugin manifest with an Ed25519 key.
    Sign(plugin::SignArgs),
    /// Measure per-request plugin cost.
    Bench(plugin::BenchArgs),
    /// Scaffold a new site plugin crate from the example site.
    New(plugin::NewArgs),
}

/// `oxbox keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 key pair (private key mode 0600).
    Generate(keys::GenerateArgs),
}

/// `oxbox dicom …`
#[derive(Debug, Subcommand)]
pub enum DicomCommand {
    /// Print, as JSON, the attributes that matter for ingest (never patient identifiers).
    Info(dicom_info::Args),
}

/// `oxbox config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration and print the effective settings.
    Check(config_check::Args),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Preprocess(args) => preprocess::run(args, config),
        Command::Predict(args) => predict::run(args, config),
        Command::Serve(args) => serve::run(args, config),
        Command::Synth(args) => synth::run(args),
        Command::Train(args) => train::run(args, config),
        Command::Evaluate(args) => evaluate::run(args, config),
        Command::Federate(args) => federate::run(args, config),
        Command::Simulate(args) => simulate::run(args, config),
        Command::Dicom(DicomCommand::Info(args)) => dicom_info::run(args, config),
        Command::Config(ConfigCommand::Check(args)) => config_check::run(args, config),
        Command::Bench(args) => bench::run(args, config),
        Command::Plugin(command) => match command {
            PluginCommand::Check(args) => plugin::check(args, &plugin::tool_config(config)?),
            PluginCommand::Run(args) => plugin::run(args, &plugin::tool_config(config)?),
            PluginCommand::Pack(args) => plugin::pack(args, &plugin::tool_config(config)?),
            PluginCommand::Sign(args) => plugin::sign(args),
            PluginCommand::Bench(args) => plugin::bench(args, &plugin::tool_config(config)?),
            PluginCommand::New(args) => plugin::new(args),
        },
        Command::Keys(KeysCommand::Generate(args)) => keys::generate(args),
        Command::Model(ModelCommand::Info(args)) => model::info(args),
        Command::Model(ModelCommand::Init(args)) => model::init(args),
        Command::Audit(AuditCommand::Tail(args)) => audit::tail(args, config),
        Command::Aggregator(AggregatorCommand::Serve(args)) => aggregator::serve(args, config),
        Command::Aggregator(AggregatorCommand::Status(args)) => aggregator::status(args, config),
    }
}

/// Loads the configuration named on the command line, or the embedded default.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<LoadedConfig> {
    Ok(LoadedConfig::load(path)?)
}

/// Bad input (a refused file, an invalid config) exits 2; anything else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let bad_input = err.chain().any(|cause| {
        cause.is::<DicomError>()
            || cause.is::<ConfigError>()
            || cause.is::<RecordError>()
            || cause
                .downcast_ref::<oxbox::pipeline::PipelineError>()
                .is_some_and(oxbox::pipeline::PipelineError::is_bad_input)
            || matches!(
                cause.downcast_ref::<oxbox::model::ModelError>(),
                Some(oxbox::model::ModelError::Invalid { .. } | oxbox::model::ModelError::Input(_))
            )
            || cause
                .downcast_ref::<PluginError>()
                .is_some_and(PluginError::is_bad_input)
            || cause
                .downcast_ref::<oxbox::plugins::manifest::ManifestError>()
                .is_some_and(oxbox::plugins::manifest::ManifestError::is_bad_input)
            || matches!(
                cause.downcast_ref::<oxbox::federation::site::SiteError>(),
                Some(oxbox::federation::site::SiteError::Config(_))
            )
            || cause.is::<oxbox::http::TokenError>()
            || cause.is::<oxbox::aggregator::AggregatorConfigError>()
            || cause.is::<oxbox::http::tls::TlsError>()
            || cause.is::<oxbox::dataset::DatasetError>()
            || cause.is::<plugin::ScaffoldError>()
            || matches!(
                cause.downcast_ref::<oxbox::signing::SigningError>(),
                Some(oxbox::signing::SigningError::KeyExists { .. })
            )
            || matches!(
                cause.downcast_ref::<oxbox::synth::SynthError>(),
                Some(
                    oxbox::synth::SynthError::Options(_) | oxbox::synth::SynthError::Output { .. }
                )
            )
            || matches!(
                cause.downcast_ref::<oxbox::train::TrainError>(),
                Some(
                    oxbox::train::TrainError::Options(_)
                        | oxbox::train::TrainError::Resume(_)
                        | oxbox::train::TrainError::Dataset(_)
                )
            )
            || matches!(
                cause.downcast_ref::<oxbox::simulate::SimulateError>(),
                Some(oxbox::simulate::SimulateError::Options(_))
            )
            || matches!(
                cause.downcast_ref::<oxbox::serve::ServeError>(),
                Some(oxbox::serve::ServeError::Token(_))
            )
    });
    if bad_input {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILURE
    }
}

/// Logs go to stderr; stdout is for results. `server`: the long-running
/// `oxbox serve`, whose operator log holds oxbox's own `info` lines
/// (refused predictions with the plugin and field at fault, reloads)
/// without `-v`; what plugins log or print at `info` still needs `-v`
/// (their text is theirs, and may be chatty).
pub fn init_logging(verbose: u8, server: bool) {
    // Dependencies' own warnings (e.g. dicom-rs on a missing optional meta
    // attribute) stay quiet unless asked for: stderr carries one error line.
    let default = match (verbose, server) {
        (0, false) => "error,oxbox=warn",
        (0, true) => "warn,oxbox=info,oxbox::plugins::bindings=warn",
        (1, _) => "warn,oxbox=info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
