//! `oxbox config check`: validate a configuration as `oxbox serve` would at
//! start (and SIGHUP on reload): the file, the token file, the model
//! package and every plugin; print the effective configuration and what
//! would be loaded.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use oxbox::plugins::manifest::SignatureStatus;
use oxbox::plugins::{PluginEngine, PluginSet};

/// Arguments of `oxbox config check` (the file comes from the global `--config`).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  oxbox config check\n  \
oxbox config check --config /etc/oxbox/oxbox.toml\n\n\
Without --config, checks the embedded default. Unknown keys, wrong types and \
unacceptable values are reported with the file, line and key; exit status 2.\n\n\
Then loads what `oxbox serve` loads at start and a reload (SIGHUP) loads again, \
the same way: [server] token_file, the [model] package, and every [[plugins]] \
entry (manifest, sha256 of the component, signature against \
sandbox.trusted_plugin_keys and require_signed_plugins, interface version and \
imports, compile, describe). Where serve would refuse to start, it fails with \
one `error:` line naming the plugin (or file) and the cause. Nothing is written: \
components are compiled without the data dir's cache.\n\n\
Prints the effective configuration (TOML), then, as `#` comments, the model and \
each plugin that would be loaded (name, version, sha256, signature status). A \
plugin signed by a key the config does not trust loads while signatures are \
optional: a `warning:` line on stderr says so.")]
pub struct Args {}

/// Runs `oxbox config check`.
pub fn run(_args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let loaded = super::load_config(config)?;
    let source = &loaded.source;
    let config = &loaded.config;
    if let Some(token_file) = &config.server.token_file {
        oxbox::http::BearerToken::from_file(token_file)
            .with_context(|| format!("{source}: server.token_file: serve would not start"))?;
    }
    let model = match &config.model.package {
        Some(dir) => {
            let package = oxbox::model::promote::load_served(dir)
                .with_context(|| format!("{source}: model.package: serve would not start"))?;
            format!(
                "{} ({} {}, digest {})",
                dir.display(),
                package.manifest.name,
                package.manifest.version,
                package.digest
            )
        }
        None => "none configured: serve and predict use the embedded demo model \
                 (synthetic data, not for clinical use)"
            .to_owned(),
    };
    let engine = Arc::new(PluginEngine::new(&config.sandbox.limits())?);
    // No compile cache: checking leaves nothing behind in the data dir.
    let plugins = PluginSet::load(config, &engine, None).with_context(|| {
        format!("{source}: [[plugins]] would not load (serve would not start, a reload would fail)")
    })?;
    for warning in plugins.warnings() {
        eprintln!("warning: {warning}");
    }

    println!("# effective configuration, from {source}");
    print!("{}", config.to_toml()?);
    println!("\n# model: {model}");
    if plugins.plugins().is_empty() {
        println!("# plugins: none");
    }
    for ((plugin, signature), entry) in plugins
        .plugins()
        .iter()
        .zip(plugins.signatures())
        .zip(&config.plugins)
    {
        let signature = match signature {
            SignatureStatus::Unsigned => "unsigned".to_owned(),
            SignatureStatus::Verified { key } => format!("verified (key {key})"),
            SignatureStatus::UntrustedKey { key } => {
                format!("untrusted-key (key {key}, not in sandbox.trusted_plugin_keys)")
            }
        };
        println!(
            "# plugin: {} {} ({}): sha256 {}, hooks [{}], signature {signature}",
            plugin.name(),
            plugin.version(),
            entry.path.display(),
            plugin.sha256(),
            plugin
                .hooks()
                .iter()
                .map(|h| h.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
