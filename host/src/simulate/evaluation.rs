//! Every model of the simulation on every site's held-out test cases
//! ([`crate::cases::HeldOut::Only`]): each site's cases go once through its
//! plugins ([`crate::cases::prepare_cases`]), then through each model;
//! per (model, site) the AUC with DeLong CI of P(level ≥ 1) at 24 h and
//! at 72 h ([`crate::metrics::auc_delong`]). A FedBN site's model is its
//! own: the global model with the batch-norm statistics the site kept
//! overlaid ([`super::federation::site_model`]); it is scored like a
//! local-only model, site i's model on every site's test cases.

use std::path::Path;

use candle_core::Device;

use super::baselines::Baselines;
use super::federation::FederatedRun;
use super::{SimSite, SimulateError, SimulateOptions};
use crate::cases::{self, HeldOut};
use crate::config::Config;
use crate::dataset;
use crate::metrics::{AucEstimate, auc_delong};
use crate::model::{Model, ModelInput, ModelPackage};
use crate::pipeline::Pipeline;

/// The horizons reported, P(level ≥ 1) at each.
pub const HORIZONS: [&str; 2] = ["24h", "72h"];

/// AUC of P(level ≥ 1) at 24 h and 72 h; `None` when a class is empty.
pub type HorizonAucs = [Option<AucEstimate>; 2];

/// One model (or one model per site) on every site's test cases:
/// `aucs[i][j]` is what the model site i uses scores on site j's test
/// cases. A model shared by every site (FedAvg's global, pooled) has equal
/// rows.
pub type CrossSite = Vec<Vec<HorizonAucs>>;

/// One federation variant's results.
#[derive(Debug, Clone)]
pub struct FederatedAucs {
    /// The variant's name.
    pub name: String,
    /// Whether a site's model is its own (the global model with the
    /// tensors the site kept at home overlaid: FedBN), not the bare global.
    pub site_specific: bool,
    /// Site i's model on site j's test cases.
    pub aucs: CrossSite,
}

/// Every AUC of the simulation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Test cases scored per site.
    pub test_cases: Vec<usize>,
    /// Test cases the pipeline refused per site.
    pub refused: Vec<usize>,
    /// Site i's local-only model on site j's test cases.
    pub local: CrossSite,
    /// Per variant: the federated model(s) on each site's test cases.
    pub federated: Vec<FederatedAucs>,
    /// The pooled model on each site's test cases (equal rows).
    pub pooled: CrossSite,
}

/// One site's prepared test cases and their labels (level ≥ 1 at 24 h,
/// 72 h).
struct TestSet {
    inputs: Vec<ModelInput>,
    labels: [Vec<bool>; 2],
    refused: usize,
}

fn load(dir: &Path) -> Result<Model, SimulateError> {
    Ok(Model::load(ModelPackage::load(dir)?, &Device::Cpu)?)
}

fn test_set(
    site: &SimSite,
    options: &SimulateOptions,
    config: &Config,
    pipeline: &Pipeline,
    engine: &std::sync::Arc<crate::plugins::PluginEngine>,
) -> Result<TestSet, SimulateError> {
    let site = HeldOut::Only(options.holdout).select(&dataset::read_site(&site.dir)?);
    let plugins = cases::site_plugins(&site, config, &options.plugins, engine)?;
    let prepared = cases::prepare_cases(&site, pipeline, &plugins, &config.limits, &|| {});
    let mut set = TestSet {
        inputs: Vec::new(),
        labels: [Vec::new(), Vec::new()],
        refused: 0,
    };
    for (input, case) in prepared.into_iter().zip(&site.cases) {
        match input {
            Ok(input) => {
                set.inputs.push(input);
                set.labels[0].push(case.level_24h >= 1);
                set.labels[1].push(case.level_72h >= 1);
            }
            Err(_) => set.refused += 1,
        }
    }
    Ok(set)
}

fn score(model: &Model, set: &TestSet) -> Result<HorizonAucs, SimulateError> {
    let mut scores = [Vec::new(), Vec::new()];
    for chunk in set.inputs.chunks(32) {
        for p in model.predict_batch(chunk)? {
            scores[0].push(f64::from(p.h24.p_o2_any));
            scores[1].push(f64::from(p.h72.p_o2_any));
        }
    }
    Ok([
        auc_delong(&scores[0], &set.labels[0]),
        auc_delong(&scores[1], &set.labels[1]),
    ])
}

/// Scores every model on every site's test cases.
///
/// # Errors
/// [`SimulateError`] when a site, its plugins or a model fail.
pub fn evaluate_all(
    options: &SimulateOptions,
    config: &Config,
    sites: &[SimSite],
    baselines: &Baselines,
    federated: &[FederatedRun],
) -> Result<Evaluation, SimulateError> {
    let engine = cases::plugin_engine(config)?;
    let pipeline = Pipeline::new(config, load(&baselines.pooled)?);
    let sets: Vec<TestSet> = sites
        .iter()
        .map(|s| test_set(s, options, config, &pipeline, &engine))
        .collect::<Result<_, _>>()?;
    let on_every = |model: &Model| -> Result<Vec<HorizonAucs>, SimulateError> {
        sets.iter().map(|set| score(model, set)).collect()
    };
    let shared = |model: &Model| -> Result<CrossSite, SimulateError> {
        Ok(vec![on_every(model)?; sites.len()])
    };
    let mut local = Vec::new();
    for dir in &baselines.local {
        local.push(on_every(&load(dir)?)?);
    }
    let mut global = Vec::new();
    for run in federated {
        let bare = load(&run.model)?;
        let site_specific = run.site_models.iter().any(Option::is_some);
        let aucs = if site_specific {
            // Each site's own model (global + its kept tensors) on every
            // site's test cases: row i is site i's model.
            let mut rows = Vec::new();
            for own in &run.site_models {
                rows.push(match own {
                    Some(dir) => on_every(&load(dir)?)?,
                    None => on_every(&bare)?,
                });
            }
            rows
        } else {
            shared(&bare)?
        };
        global.push(FederatedAucs {
            name: run.name.clone(),
            site_specific,
            aucs,
        });
    }
    Ok(Evaluation {
        test_cases: sets.iter().map(|s| s.inputs.len()).collect(),
        refused: sets.iter().map(|s| s.refused).collect(),
        local,
        federated: global,
        pooled: shared(pipeline.model())?,
    })
}
