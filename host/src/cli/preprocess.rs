//! `oxbox preprocess`: DICOM chest radiograph → model-ready `.npy` (+ PNG).

use std::path::{Path, PathBuf};

use anyhow::Context;
use oxbox::{dicom, output};

/// Arguments of `oxbox preprocess`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
oxbox preprocess --dicom chest.dcm --out chest.npy\n  \
oxbox preprocess --dicom chest.dcm --out chest.npy --size 512 --png chest.png\n\n\
Writes float32, little-endian, C-order, shape (1, S, S), values in [0, 1] (0 = air, \
1 = bone), following canonical chest-radiograph preprocessing v1. Prints a JSON summary \
(shape, VOI rule, mean) on stdout. A refused or corrupt file exits 2 and writes nothing.")]
pub struct Args {
    /// The DICOM file (any supported transfer syntax; frame 1 of multi-frame objects).
    #[arg(long, value_name = "FILE")]
    pub dicom: PathBuf,
    /// Where to write the tensor (.npy).
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,
    /// Output side S; default: model.input_size from the config (224).
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub size: Option<u32>,
    /// Also write the tensor as an 8-bit grayscale PNG, for eyes.
    #[arg(long, value_name = "OUT.png")]
    pub png: Option<PathBuf>,
}

/// Runs `oxbox preprocess`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let config = super::load_config(config)?.config;
    let size = args.size.unwrap_or(config.model.input_size);
    let image = dicom::preprocess_file(&args.dicom, size, &config.limits)
        .with_context(|| format!("{}", args.dicom.display()))?;
    let side = size as usize;
    output::write_npy(&args.out, &[1, side, side], &image.data)?;
    if let Some(png) = &args.png {
        output::write_png_gray(png, size, &image.data)?;
    }
    let summary = serde_json::json!({
        "shape": [1, side, side],
        "voi": image.voi.as_str(),
        "mean": image.mean(),
    });
    println!("{summary}");
    Ok(())
}
