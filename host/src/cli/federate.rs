//! `oxbox federate`: this box as a site of a federated training job (the
//! `[federation]` section of its config), polling the aggregator.

use std::sync::Mutex;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use oxbox::federation::protocol::Phase;
use oxbox::federation::site::{SiteClient, SiteEvent, Step};

/// Arguments of `oxbox federate`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  oxbox federate --config /etc/oxbox/oxbox.toml\n  \
oxbox federate --config site-1/oxbox.toml --exit-when-finished\n\n\
Long-running: polls federation.aggregator_url (the site opens no port), verifies every task \
and global model against federation.aggregator_key before using it, trains each round \
locally on federation.data through the site's plugins, and uploads only the filtered, signed \
update. Progress persists under <storage.data_dir>/federation/: stopped at any moment, it \
resumes where it was (training from its last epoch, an upload with only the shards the \
aggregator lacks). Lines on stderr say what happens (never a patient or a case); with \
--exit-when-finished it prints a JSON summary on stdout when the job is finished and exits 0. \
Exit status 1 when something the aggregator sent is refused (bad signature, digest mismatch) \
or the site's data or state is unusable; 2 for a bad config."
)]
pub struct Args {
    /// Exit 0 once the aggregator says the job is finished (else keep
    /// polling for the next job).
    #[arg(long, alias = "once-finished-exit")]
    pub exit_when_finished: bool,
}

/// Runs `oxbox federate`.
pub fn run(args: Args, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let loaded = super::load_config(config)?;
    let config = loaded.config;
    oxbox::model::set_compute_threads(config.model.threads);
    let display = Display::default();
    let on_event = |event: SiteEvent| display.show(event);
    let mut site = SiteClient::new(&config, &on_event)?;
    let outcome = site.run(args.exit_when_finished);
    display.clear();
    let outcome = outcome.context("federate")?;
    if let Step::Finished { job, round, digest } = outcome {
        let counters = site.counters();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "job": job,
                "site": config.site.id,
                "final_round": round,
                "final_model": digest,
                "counters": counters,
            }))?
        );
    }
    Ok(())
}

/// The terminal display: one bar at a time, and a line per milestone.
#[derive(Default)]
struct Display {
    bar: Mutex<Option<ProgressBar>>,
    last_task: Mutex<Option<(Phase, u64)>>,
}

impl Display {
    fn style(template: &str) -> ProgressStyle {
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
    }

    /// A line on stderr, above the bar when there is one.
    fn say(bar: &Option<ProgressBar>, line: &str) {
        match bar {
            Some(b) if !b.is_hidden() => b.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    fn replace(bar: &mut Option<ProgressBar>, new: Option<ProgressBar>) {
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        *bar = new;
    }

    fn clear(&self) {
        if let Ok(mut bar) = self.bar.lock() {
            Self::replace(&mut bar, None);
        }
    }

    fn show(&self, event: SiteEvent) {
        let Ok(mut bar) = self.bar.lock() else {
            return;
        };
        match event {
            SiteEvent::Task {
                job,
                phase,
                round,
                rounds,
            } => {
                let Ok(mut last) = self.last_task.lock() else {
                    return;
                };
                if *last != Some((phase, round)) {
                    *last = Some((phase, round));
                    let what = match phase {
                        Phase::Statistics => "statistics round".to_owned(),
                        Phase::Training => format!("round {round} of {rounds}"),
                        Phase::Finished => "finished".to_owned(),
                    };
                    Self::say(&bar, &format!("federate: job {job}: {what}"));
                }
            }
            SiteEvent::ModelVerified { round, digest } => Self::say(
                &bar,
                &format!(
                    "federate: global model of round {round} ({}) verified: signature and digest",
                    digest.get(..12).unwrap_or(&digest)
                ),
            ),
            SiteEvent::Preparing { total } => {
                let b = ProgressBar::new(total as u64);
                b.set_style(Self::style(
                    "preparing {bar:30} {pos}/{len} cases (decode, site plugin)",
                ));
                Self::replace(&mut bar, Some(b));
            }
            SiteEvent::Prepared => {
                if let Some(b) = bar.as_ref() {
                    b.inc(1);
                }
            }
            SiteEvent::CasesReady {
                train,
                held_out,
                refused,
            } => {
                Self::replace(&mut bar, None);
                Self::say(
                    &bar,
                    &format!(
                        "federate: {train} training cases, {held_out} held out, {refused} refused"
                    ),
                );
            }
            SiteEvent::StatisticsSent { new } => Self::say(
                &bar,
                if new {
                    "federate: statistics sent"
                } else {
                    "federate: statistics were already accepted"
                },
            ),
            SiteEvent::Training {
                round,
                first_epoch,
                epochs,
                steps_per_epoch,
            } => {
                let resumed = if first_epoch > 1 {
                    format!(
                        " (resumed from the checkpoint of epoch {})",
                        first_epoch - 1
                    )
                } else {
                    String::new()
                };
                let b = ProgressBar::new(((epochs + 1 - first_epoch) * steps_per_epoch) as u64);
                b.set_style(Self::style(
                    "training {bar:30} epoch {prefix} loss {msg}  {elapsed}, ETA {eta}",
                ));
                Self::say(
                    &bar,
                    &format!(
                        "federate: round {round}: training epochs {first_epoch}..={epochs}{resumed}"
                    ),
                );
                Self::replace(&mut bar, Some(b));
            }
            SiteEvent::Step { epoch, loss } => {
                if let Some(b) = bar.as_ref() {
                    b.set_prefix(epoch.to_string());
                    b.set_message(format!("{loss:.4}"));
                    b.inc(1);
                }
            }
            SiteEvent::Epoch { round, epoch, loss } => Self::say(
                &bar,
                &format!(
                    "federate: round {round}: epoch {epoch} done, loss {loss:.4}, checkpointed"
                ),
            ),
            SiteEvent::UpdateReady {
                round,
                shards,
                bytes,
                nonzero,
            } => {
                Self::replace(&mut bar, None);
                Self::say(
                    &bar,
                    &format!(
                        "federate: round {round}: update signed: {shards} shard(s), {bytes} bytes, \
                         {nonzero} entries shared"
                    ),
                );
            }
            SiteEvent::Uploading {
                round,
                missing,
                bytes,
                already,
            } => {
                Self::say(
                    &bar,
                    &format!(
                        "federate: round {round}: manifest accepted; sending {missing} shard(s), \
                         {bytes} bytes ({already} already at the aggregator)"
                    ),
                );
                let b = ProgressBar::new(bytes);
                b.set_style(Self::style(
                    "uploading {bar:30} {bytes}/{total_bytes}  {bytes_per_sec}",
                ));
                Self::replace(&mut bar, Some(b));
            }
            SiteEvent::ShardSent { bytes } => {
                if let Some(b) = bar.as_ref() {
                    b.inc(bytes);
                }
                Self::say(&bar, &format!("federate: shard stored ({bytes} bytes)"));
            }
            SiteEvent::Uploaded { round } => {
                Self::replace(&mut bar, None);
                Self::say(&bar, &format!("federate: round {round}: update complete"));
            }
            SiteEvent::UpdateRefused { round, reason } => {
                Self::replace(&mut bar, None);
                Self::say(
                    &bar,
                    &format!(
                        "federate: round {round}: the aggregator refused the update: {reason}"
                    ),
                );
            }
            SiteEvent::Retrying {
                what,
                attempt,
                wait,
                reason,
            } => Self::say(
                &bar,
                &format!(
                    "federate: {what} failed ({reason}); attempt {attempt} in {:.1} s",
                    wait.as_secs_f64()
                ),
            ),
            SiteEvent::Evaluated {
                round,
                auc,
                served_auc,
                promoted,
            } => {
                let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.3}"));
                Self::say(
                    &bar,
                    &format!(
                        "federate: global model of round {round}: held-out AUC {} (served {}){}",
                        show(auc),
                        show(served_auc),
                        if promoted { ", promoted" } else { "" }
                    ),
                );
            }
            SiteEvent::Finished { round, .. } => {
                Self::replace(&mut bar, None);
                Self::say(
                    &bar,
                    &format!("federate: the job is finished; final model of round {round}"),
                );
            }
        }
    }
}
