//! `oxbox audit tail`: the last predictions (or administrative events) from
//! the audit log.

use std::path::Path;

use oxbox::store::AuditLog;

/// Arguments of `oxbox audit tail`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  oxbox audit tail -n 20 --config /etc/oxbox/oxbox.toml\n\n\
Prints the last N audit records as JSON lines, oldest first: time, request id, model \
digest, plugin versions, outputs, timings, status (ok, rejected or failed) and, for a \
refused prediction, the reason: the stage, plugin and field at fault (never a value \
from the input). No patient identifier is ever recorded. With --admin, the administrative events instead: plugin and model reloads (HTTP or \
SIGHUP), who asked, the outcome, and the plugins' names, versions and sha256 (or the \
model's name, version, digest and federation round) before and after."
)]
pub struct TailArgs {
    /// How many records.
    #[arg(short = 'n', long, default_value_t = 10)]
    pub lines: usize,
    /// Administrative events (plugin and model reloads) instead of predictions.
    #[arg(long)]
    pub admin: bool,
}

/// Runs `oxbox audit tail`.
pub fn tail(args: TailArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let config = super::load_config(config)?.config;
    let log = AuditLog::open(&config.storage.data_dir)?;
    if args.admin {
        for event in log.admin_tail(args.lines)? {
            println!("{}", serde_json::to_string(&event)?);
        }
    } else {
        for record in log.tail(args.lines)? {
            println!("{}", serde_json::to_string(&record)?);
        }
    }
    Ok(())
}
