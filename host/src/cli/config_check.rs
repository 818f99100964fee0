//! `oxbox config check`: validate a configuration, print the effective one.

use std::path::Path;

/// Arguments of `oxbox config check` (the file comes from the global `--config`).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  oxbox config check\n  \
oxbox config check --config /etc/oxbox/oxbox.toml\n\n\
Without --config, checks the embedded default. Unknown keys, wrong types and \
unacceptable values are reported with the file, line and key; exit status 2.")]
pub struct Args {}

/// Runs `oxbox config check`.
pub fn run(_args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let loaded = super::load_config(config)?;
    println!("# effective configuration, from {}", loaded.source);
    print!("{}", loaded.config.to_toml()?);
    Ok(())
}
