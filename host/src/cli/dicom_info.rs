//! `oxbox dicom info`: the ingest-relevant header of a DICOM file, as JSON.

use std::path::{Path, PathBuf};

use anyhow::Context;
use oxbox::dicom::{DicomFile, ImageHeader};

/// Arguments of `oxbox dicom info`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  oxbox dicom info chest.dcm\n\n\
Prints modality, SOP class, photometric interpretation, bit depths, size, frames, \
transfer syntax, window, VOI LUT function, presentation LUT shape, pixel padding, body \
part and view position. Never prints patient name, ID, birth date or any other \
identifying attribute.")]
pub struct Args {
    /// The DICOM file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Runs `oxbox dicom info`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let config = super::load_config(config)?.config;
    let header = DicomFile::open(&args.file, &config.limits)
        .and_then(|file| ImageHeader::read(&file))
        .with_context(|| format!("{}", args.file.display()))?;
    println!("{}", serde_json::to_string_pretty(&header)?);
    Ok(())
}
