//! `oxbox model …`: inspect and create model packages.

use std::path::{Path, PathBuf};

use oxbox::model::{self, Architecture, Backbone, Model, ModelPackage};

/// Arguments of `oxbox model info`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  oxbox model info models/demo\n\n\
Prints, as JSON: name, version, whether it was trained, input size, architecture, \
EMR features, digest (sha256 over the package's files) and parameter count.")]
pub struct InfoArgs {
    /// The package folder (model.toml + weights.safetensors).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Arguments of `oxbox model init`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  oxbox model init --out models/demo --backbone tiny --seed 0\n\n\
Writes a package with a deterministic random initialisation (trained = false): the \
same arguments give the same weights and digest on every machine. Training \
(`oxbox train`) replaces it with learned weights."
)]
pub struct InitArgs {
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Image backbone.
    #[arg(long, value_enum, default_value = "resnet18")]
    pub backbone: Backbone,
    /// No image branch: EMR only.
    #[arg(long)]
    pub emr_only: bool,
    /// Side S of the (1, S, S) image input.
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub input_size: u32,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model name.
    #[arg(long, default_value = "exam-demo")]
    pub name: String,
}

fn describe(package: &ModelPackage) -> anyhow::Result<serde_json::Value> {
    let parameters = parameter_count(&package.weights_path())?;
    let m = &package.manifest;
    Ok(serde_json::json!({
        "name": m.name,
        "version": m.version,
        "trained": m.trained,
        "digest": package.digest,
        "input_size": m.input_size,
        "architecture": m.architecture,
        "emr_features": m.emr.iter().map(|f| &f.name).collect::<Vec<_>>(),
        "parameters": parameters,
    }))
}

/// Counts the values stored in a safetensors file (weights and batch-norm
/// statistics).
fn parameter_count(path: &Path) -> anyhow::Result<usize> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)?;
    Ok(tensors.values().map(candle_core::Tensor::elem_count).sum())
}

/// Runs `oxbox model info`.
pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    let package = ModelPackage::load(&args.dir)?;
    // Loading proves the weights fit the architecture.
    Model::load(package.clone(), &candle_core::Device::Cpu)?;
    println!("{}", serde_json::to_string_pretty(&describe(&package)?)?);
    Ok(())
}

/// Runs `oxbox model init`.
pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let architecture = Architecture {
        backbone: args.backbone,
        emr_only: args.emr_only,
        cross_layers: 2,
        deep_layers: vec![64, 64],
        fusion_layers: vec![128],
    };
    let package = model::init_package(
        &args.out,
        &args.name,
        architecture,
        args.input_size,
        args.seed,
    )?;
    println!("{}", serde_json::to_string_pretty(&describe(&package)?)?);
    Ok(())
}
