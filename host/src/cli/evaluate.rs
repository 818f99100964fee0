//! `oxbox evaluate`: a model on labelled site folders → report.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use oxbox::evaluate::{EvaluateOptions, evaluate};
use oxbox::model::{Model, ModelPackage, select_device, set_compute_threads};
use oxbox::pipeline::Pipeline;

/// Arguments of `oxbox evaluate`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  oxbox evaluate --model models/demo --data cohorts/demo/site-1 cohorts/demo/site-2 --out reports/demo\n\n\
Runs every case of each site folder (as `oxbox synth` writes them: site.toml, cases.csv, \
labels.csv, images/) through that site's plugin (site.toml names it; found in --plugins-dir, \
the configured [[plugins]], the site folder's plugins/, then the installation's plugins/dist; \
never the working directory) and the model, then writes REPORT_DIR/report.json, report.md, scores.csv and per site (and pooled) \
ROC curves and reliability diagrams as PNG and SVG. Per output: AUC with DeLong 95 % CI, \
sensitivity and specificity at --threshold, expected calibration error."
)]
pub struct Args {
    /// The model package.
    #[arg(long, value_name = "MODEL_DIR")]
    pub model: PathBuf,
    /// Site folders.
    #[arg(long, value_name = "SITE_DIR", num_args = 1.., value_delimiter = ',', required = true)]
    pub data: Vec<PathBuf>,
    /// Report folder.
    #[arg(long, value_name = "REPORT_DIR")]
    pub out: PathBuf,
    /// Where the site plugins are built (DIR/<plugin>/plugin.toml), looked
    /// in first; then the configured [[plugins]], the site folder's
    /// plugins/, and the plugins/dist of the oxbox installation.
    #[arg(long, value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Operating point: a probability threshold.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f64,
    /// Score only the held-out test cases at this share (those `oxbox
    /// train --exclude-held-out` with the same share never trained on).
    #[arg(long, value_name = "SHARE")]
    pub held_out_only: Option<f64>,
}

/// Runs `oxbox evaluate`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.threshold),
        "--threshold {}: a probability between 0 and 1",
        args.threshold
    );
    let held_out = args
        .held_out_only
        .map_or(oxbox::cases::HeldOut::All, oxbox::cases::HeldOut::Only);
    anyhow::ensure!(
        held_out.is_valid(),
        "--held-out-only: a share strictly between 0 and 1"
    );
    let config = super::load_config(config)?.config;
    set_compute_threads(config.model.threads);
    let device = select_device(
        oxbox::config::parse_device(&config.model.device)
            .ok_or_else(|| anyhow::anyhow!("model.device = {:?}", config.model.device))?,
    )?;
    let pipeline = Pipeline::new(
        &config,
        Model::load(ModelPackage::load(&args.model)?, &device)?,
    );
    let total: usize = args
        .data
        .iter()
        .map(|d| oxbox::dataset::read_site(d).map(|s| held_out.select(&s).cases.len()))
        .sum::<Result<usize, _>>()?;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} cases  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let options = EvaluateOptions {
        sites: args.data,
        plugins: oxbox::dataset::PluginLookup {
            dir: args.plugins_dir,
            installed: oxbox::dataset::PluginLookup::installed_dir(),
        },
        out: args.out.clone(),
        threshold: args.threshold,
        held_out,
    };
    let report = evaluate(&options, &pipeline, &config, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let summary: Vec<serde_json::Value> = report
        .groups
        .iter()
        .map(|g| {
            serde_json::json!({
                "group": g.group,
                "cases": g.cases,
                "refused": g.refused.len(),
                "auc_p_o2_any_24h": g.outputs[0].auc.map(|a| (a.auc * 1e4).round() / 1e4),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "report": args.out.join("report.md").display().to_string(),
            "groups": summary,
        }))?
    );
    Ok(())
}
