//! Debugging aid: writes frame 1's stored values (before any LUT) as a
//! float32 `.npy`, to compare a decoder with another toolkit's.
//!
//!     cargo run --release --example stored_values -- FILE.dcm OUT.npy

use std::path::PathBuf;

use anyhow::Context;
use oxbox::config::LimitsConfig;
use oxbox::dicom::{DicomFile, ImageHeader, pixels};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(input), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: stored_values FILE.dcm OUT.npy");
    };
    let limits = LimitsConfig::default();
    let file = DicomFile::open(&input, &limits)?;
    let header = ImageHeader::read(&file)?;
    let geometry = header.accept(&limits)?;
    let frame = pixels::decode_first_frame(&file, &geometry).context("decode")?;
    let values: Vec<f32> = frame.stored_values().iter().map(|&v| v as f32).collect();
    oxbox::output::write_npy(
        &out,
        &[frame.rows as usize, frame.columns as usize],
        &values,
    )?;
    Ok(())
}
