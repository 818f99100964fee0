//! `oxbox evaluate`: a model on labelled site folders, per output and per
//! site (and pooled): AUC with its DeLong 95 % CI, sensitivity and
//! specificity at an operating point, calibration (ECE and a reliability
//! diagram), ROC curves — as `report.json`, `report.md`, `scores.csv` and
//! PNG + SVG charts (plotters). Cases go through each site's plugin and the
//! model exactly as predictions do ([`crate::cases`]: `Pipeline::prepare`;
//! then the batched forward).
//!
//! - this module: running the cases, computing the statistics;
//! - [`report`]: the Markdown report;
//! - [`charts`]: ROC curves and reliability diagrams.

pub mod charts;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::cases::{self, prepare_cases, site_plugins};
use crate::config::Config;
use crate::dataset::{self, Site};
use crate::metrics::{self, AucEstimate, CalibrationBin};
use crate::model::{ModelInput, Prediction};
use crate::pipeline::Pipeline;
use crate::plugins::PluginSet;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    /// A site folder is unreadable.
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    /// A site's cases could not be prepared (its plugin).
    #[error(transparent)]
    Cases(#[from] crate::cases::CasesError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Writing the report failed.
    #[error(transparent)]
    Write(#[from] crate::output::OutputError),
    /// A chart could not be drawn.
    #[error("chart {path}: {reason}")]
    Chart {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The six outputs: (horizon, name, threshold k for level ≥ k).
pub const OUTPUTS: [(&str, &str, u8); 6] = [
    ("24h", "p_o2_any", 1),
    ("24h", "p_o2_high_flow_or_niv", 2),
    ("24h", "p_ventilation_or_death", 3),
    ("72h", "p_o2_any", 1),
    ("72h", "p_o2_high_flow_or_niv", 2),
    ("72h", "p_ventilation_or_death", 3),
];

/// One case's scores and labels.
#[derive(Debug, Clone, Serialize)]
pub struct ScoredCase {
    /// Site id.
    pub site: String,
    /// Case id.
    pub case_id: String,
    /// The six probabilities, in [`OUTPUTS`] order.
    pub scores: [f64; 6],
    /// Oxygen level within 24 h.
    pub level_24h: u8,
    /// Oxygen level within 72 h.
    pub level_72h: u8,
}

impl ScoredCase {
    fn label(&self, output: usize) -> bool {
        let (horizon, _, k) = OUTPUTS[output];
        let level = if horizon == "24h" {
            self.level_24h
        } else {
            self.level_72h
        };
        level >= k
    }
}

/// The statistics of one output on one group of cases.
#[derive(Debug, Clone, Serialize)]
pub struct OutputMetrics {
    /// "24h" or "72h".
    pub horizon: &'static str,
    /// The output's name.
    pub output: &'static str,
    /// AUC with DeLong CI; `None` when a class is empty.
    pub auc: Option<AucEstimate>,
    /// The operating point (probability threshold).
    pub threshold: f64,
    /// Sensitivity at the operating point.
    pub sensitivity: f64,
    /// Specificity at the operating point.
    pub specificity: f64,
    /// Expected calibration error (10 bins).
    pub ece: f64,
    /// The reliability diagram's bins.
    pub reliability: Vec<CalibrationBin>,
    /// The ROC curve (FPR, TPR).
    #[serde(skip)]
    pub roc: Vec<(f64, f64)>,
}

/// One group (a site, or all sites pooled).
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// Site id, or "pooled".
    pub group: String,
    /// Cases evaluated.
    pub cases: usize,
    /// Cases the pipeline refused (not scored), by reason.
    pub refused: Vec<String>,
    /// Per output.
    pub outputs: Vec<OutputMetrics>,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The model's identity.
    pub model: crate::pipeline::ModelIdentity,
    /// Per site, then pooled.
    pub groups: Vec<GroupReport>,
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    /// Site folders.
    pub sites: Vec<PathBuf>,
    /// Where the sites' plugins are found.
    pub plugins: dataset::PluginLookup,
    /// Report folder.
    pub out: PathBuf,
    /// Operating point: probability threshold for sensitivity/specificity.
    pub threshold: f64,
    /// Which cases are scored: [`cases::HeldOut::Only`] tests on the
    /// held-out cases alone ([`cases::is_held_out`]).
    pub held_out: cases::HeldOut,
}

fn scores(p: &Prediction) -> [f64; 6] {
    [
        p.h24.p_o2_any,
        p.h24.p_o2_high_flow_or_niv,
        p.h24.p_ventilation_or_death,
        p.h72.p_o2_any,
        p.h72.p_o2_high_flow_or_niv,
        p.h72.p_ventilation_or_death,
    ]
    .map(f64::from)
}

/// Runs every case of `site` through its plugins and the model; refused
/// cases are returned as reasons (categories, never values).
///
/// # Errors
/// Model failures.
pub fn score_site(
    site: &Site,
    pipeline: &Pipeline,
    plugins: &Arc<PluginSet>,
    limits: &crate::config::LimitsConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<(Vec<ScoredCase>, Vec<String>), EvaluateError> {
    let prepared = prepare_cases(site, pipeline, plugins, limits, &|| {});
    let mut scored = Vec::new();
    let mut refused = Vec::new();
    let mut batch: Vec<(usize, ModelInput)> = Vec::new();
    let flush = |batch: &mut Vec<(usize, ModelInput)>,
                 scored: &mut Vec<ScoredCase>|
     -> Result<(), EvaluateError> {
        let inputs: Vec<ModelInput> = batch.iter().map(|(_, i)| i.clone()).collect();
        let predictions = pipeline.model().predict_batch(&inputs)?;
        for ((index, _), prediction) in batch.drain(..).zip(predictions) {
            let case = &site.cases[index];
            scored.push(ScoredCase {
                site: site.id.clone(),
                case_id: case.case_id.clone(),
                scores: scores(&prediction),
                level_24h: case.level_24h,
                level_72h: case.level_72h,
            });
            progress();
        }
        Ok(())
    };
    for (index, result) in prepared.into_iter().enumerate() {
        match result {
            Ok(input) => {
                batch.push((index, input));
                if batch.len() == 8 {
                    flush(&mut batch, &mut scored)?;
                }
            }
            Err(reason) => {
                refused.push(reason);
                progress();
            }
        }
    }
    flush(&mut batch, &mut scored)?;
    Ok((scored, refused))
}

/// The statistics of every output over `cases`.
pub fn group_metrics(cases: &[ScoredCase], threshold: f64) -> Vec<OutputMetrics> {
    (0..OUTPUTS.len())
        .map(|o| {
            let s: Vec<f64> = cases.iter().map(|c| c.scores[o]).collect();
            let l: Vec<bool> = cases.iter().map(|c| c.label(o)).collect();
            let (sensitivity, specificity) = metrics::sensitivity_specificity(&s, &l, threshold);
            let (ece, reliability) = metrics::calibration(&s, &l, 10);
            OutputMetrics {
                horizon: OUTPUTS[o].0,
                output: OUTPUTS[o].1,
                auc: metrics::auc_delong(&s, &l),
                threshold,
                sensitivity,
                specificity,
                ece,
                reliability,
                roc: metrics::roc_curve(&s, &l),
            }
        })
        .collect()
}

/// Evaluates `pipeline`'s model on the site folders and writes the report.
///
/// # Errors
/// [`EvaluateError`].
pub fn evaluate(
    options: &EvaluateOptions,
    pipeline: &Pipeline,
    config: &Config,
    progress: &(dyn Fn() + Sync),
) -> Result<Report, EvaluateError> {
    let engine = cases::plugin_engine(config)?;
    let mut groups = Vec::new();
    let mut all = Vec::new();
    let mut all_refused = Vec::new();
    for dir in &options.sites {
        let site = options.held_out.select(&dataset::read_site(dir)?);
        let plugins = site_plugins(&site, config, &options.plugins, &engine)?;
        let (scored, refused) = score_site(&site, pipeline, &plugins, &config.limits, progress)?;
        groups.push(GroupReport {
            group: site.id.clone(),
            cases: scored.len(),
            refused: refused.clone(),
            outputs: group_metrics(&scored, options.threshold),
        });
        all.extend(scored);
        all_refused.extend(refused);
    }
    if options.sites.len() > 1 {
        groups.push(GroupReport {
            group: "pooled".to_owned(),
            cases: all.len(),
            refused: all_refused,
            outputs: group_metrics(&all, options.threshold),
        });
    }
    let report = Report {
        model: pipeline.model_identity(),
        groups,
    };
    std::fs::create_dir_all(&options.out).map_err(|source| crate::output::OutputError::Io {
        path: options.out.display().to_string(),
        source,
    })?;
    write_text(
        &options.out.join("report.json"),
        &serde_json::to_string_pretty(&report).unwrap_or_default(),
    )?;
    write_text(&options.out.join("scores.csv"), &scores_csv(&all))?;
    write_text(&options.out.join("report.md"), &report::markdown(&report))?;
    for group in &report.groups {
        charts::draw_group(&options.out, group)?;
    }
    Ok(report)
}

fn scores_csv(cases: &[ScoredCase]) -> String {
    let mut text = String::from("site,case_id,level_24h,level_72h");
    for (h, name, _) in OUTPUTS {
        text.push_str(&format!(",{name}_{h}"));
    }
    text.push('\n');
    for c in cases {
        text.push_str(&format!(
            "{},{},{},{}",
            c.site, c.case_id, c.level_24h, c.level_72h
        ));
        for s in c.scores {
            text.push_str(&format!(",{s}"));
        }
        text.push('\n');
    }
    text
}

fn write_text(path: &Path, text: &str) -> Result<(), EvaluateError> {
    Ok(crate::output::write_bytes(path, text.as_bytes())?)
}
