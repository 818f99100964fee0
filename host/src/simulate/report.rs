//! `report.json` and `report.md` of a simulation: per horizon and model
//! (local-only, each federated variant, pooled) the per-site AUC with
//! DeLong 95 % CI, the mean AUC and the generalisability (mean AUC on the
//! other sites' test sets), the bytes each site sent per round, the
//! issue's targets with whether they are met, and where time went.

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use super::evaluation::{Evaluation, HORIZONS, HorizonAucs};
use super::federation::FederatedRun;
use super::{SimSite, SimulateError, SimulateOptions, Variant};

/// The settings of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The cohort folder.
    pub data: String,
    /// Rounds.
    pub rounds: u64,
    /// Local epochs per round.
    pub epochs_per_round: usize,
    /// Epochs of the local-only and pooled models.
    pub baseline_epochs: usize,
    /// Backbone.
    pub backbone: crate::model::Backbone,
    /// EMR-only models.
    pub emr_only: bool,
    /// Image side.
    pub input_size: u32,
    /// Batch size.
    pub batch_size: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Held-out share per site.
    pub holdout: f64,
    /// Seed.
    pub seed: u64,
    /// Variants.
    pub variants: Vec<String>,
}

/// One site of the cohort.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRow {
    /// Site id.
    pub id: String,
    /// Cases.
    pub cases: usize,
    /// Held-out test cases scored.
    pub test_cases: usize,
    /// Test cases the pipeline refused.
    pub refused: usize,
}

/// One AUC of one model on one site's test cases.
#[derive(Debug, Clone, Serialize)]
pub struct SiteAuc {
    /// Site id.
    pub site: String,
    /// AUC (`None`: a class is empty in the test set).
    pub auc: Option<f64>,
    /// Lower end of the DeLong 95 % CI.
    pub ci_low: Option<f64>,
    /// Upper end.
    pub ci_high: Option<f64>,
    /// Positive test cases.
    pub positives: usize,
    /// Negative test cases.
    pub negatives: usize,
}

/// One model's results at one horizon.
#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    /// `local-only`, `federated fedavg`, `pooled`, …
    pub model: String,
    /// `local`, `federated` or `pooled`.
    pub kind: &'static str,
    /// Whether each site has its own model (local-only; FedBN: the global
    /// model with the site's own batch-norm statistics): then `per_site`
    /// is site i's model on its own test cases and `generalisability` site
    /// i's model on the other sites'. Otherwise one model serves all.
    pub site_specific: bool,
    /// On each site's own test cases (local-only: the site's own model).
    pub per_site: Vec<SiteAuc>,
    /// Mean of `per_site`.
    pub mean_auc: Option<f64>,
    /// Mean AUC on the other sites' test sets (local-only: site i's model
    /// on every site j ≠ i; averaged over i).
    pub generalisability: Option<f64>,
}

/// One horizon's results.
#[derive(Debug, Clone, Serialize)]
pub struct HorizonResult {
    /// `24h` or `72h`.
    pub horizon: &'static str,
    /// The output: P(level ≥ 1).
    pub output: &'static str,
    /// Local-only, then each variant, then pooled.
    pub models: Vec<ModelResult>,
}

/// Bytes one site sent in one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundBytes {
    /// Round (0: statistics, when the aggregator reports it).
    pub round: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Bytes per site of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct SiteTraffic {
    /// Site id.
    pub site: String,
    /// Per round.
    pub per_round: Vec<RoundBytes>,
    /// All rounds.
    pub total: u64,
}

/// One federation job.
#[derive(Debug, Clone, Serialize)]
pub struct FederationSummary {
    /// The variant.
    pub variant: String,
    /// Final global model digest.
    pub digest: String,
    /// Rounds.
    pub rounds: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Bytes each site sent.
    pub bytes: Vec<SiteTraffic>,
    /// Mean bytes per site per round (training rounds).
    pub mean_bytes_per_site_round: Option<f64>,
}

/// One of the targets.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// What it must reach.
    pub goal: f64,
    /// Whether it does.
    pub met: bool,
}

/// Where time went, seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Seconds {
    /// The federation jobs.
    pub federation: f64,
    /// Local-only and pooled training.
    pub baselines: f64,
    /// Scoring.
    pub evaluation: f64,
    /// All.
    pub total: f64,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SimulationReport {
    /// Settings.
    pub settings: Settings,
    /// Sites.
    pub sites: Vec<SiteRow>,
    /// Per horizon.
    pub horizons: Vec<HorizonResult>,
    /// Per federation job.
    pub federations: Vec<FederationSummary>,
    /// The targets at 24 h.
    pub targets: Vec<Target>,
    /// Time.
    pub seconds: Seconds,
}

fn site_auc(site: &str, aucs: &HorizonAucs, h: usize) -> SiteAuc {
    let a = aucs[h];
    SiteAuc {
        site: site.to_owned(),
        auc: a.map(|a| a.auc),
        ci_low: a.map(|a| a.ci_low),
        ci_high: a.map(|a| a.ci_high),
        positives: a.map_or(0, |a| a.positives),
        negatives: a.map_or(0, |a| a.negatives),
    }
}

fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Mean over models i of the mean AUC of model i on sites j ≠ i.
fn generalisability(n: usize, auc: impl Fn(usize, usize) -> Option<f64>) -> Option<f64> {
    mean((0..n).map(|i| mean((0..n).filter(|&j| j != i).map(|j| auc(i, j)))))
}

/// One model's result at horizon `h` from its cross-site AUCs: per site,
/// the model site i uses on its own test cases; generalisability, site
/// i's model on every other site's (for a shared model: the one model on
/// each site's test cases, as each other site sees it).
fn model_result(
    name: String,
    kind: &'static str,
    site_specific: bool,
    sites: &[SimSite],
    aucs: &[Vec<HorizonAucs>],
    h: usize,
) -> ModelResult {
    let per_site: Vec<SiteAuc> = sites
        .iter()
        .enumerate()
        .map(|(i, s)| site_auc(&s.id, &aucs[i][i], h))
        .collect();
    ModelResult {
        model: name,
        kind,
        site_specific,
        mean_auc: mean(per_site.iter().map(|s| s.auc)),
        generalisability: generalisability(sites.len(), |i, j| aucs[i][j][h].map(|a| a.auc)),
        per_site,
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

impl SimulationReport {
    /// Builds the report from the evaluation.
    pub fn new(
        options: &SimulateOptions,
        sites: &[SimSite],
        evaluation: &Evaluation,
        federated: &[FederatedRun],
        seconds: Seconds,
    ) -> Self {
        let horizons: Vec<HorizonResult> = HORIZONS
            .iter()
            .enumerate()
            .map(|(h, horizon)| {
                let mut models = vec![model_result(
                    "local-only".to_owned(),
                    "local",
                    true,
                    sites,
                    &evaluation.local,
                    h,
                )];
                for run in &evaluation.federated {
                    models.push(model_result(
                        format!("federated {}", run.name),
                        "federated",
                        run.site_specific,
                        sites,
                        &run.aucs,
                        h,
                    ));
                }
                models.push(model_result(
                    "pooled".to_owned(),
                    "pooled",
                    false,
                    sites,
                    &evaluation.pooled,
                    h,
                ));
                HorizonResult {
                    horizon,
                    output: "P(level >= 1)",
                    models,
                }
            })
            .collect();
        let federations = federated
            .iter()
            .map(|run| {
                let bytes: Vec<SiteTraffic> = run
                    .bytes
                    .iter()
                    .map(|s| SiteTraffic {
                        site: s.site.clone(),
                        per_round: s
                            .per_round
                            .iter()
                            .map(|&(round, bytes)| RoundBytes { round, bytes })
                            .collect(),
                        total: s.per_round.iter().map(|r| r.1).sum(),
                    })
                    .collect();
                let training: Vec<f64> = run
                    .bytes
                    .iter()
                    .flat_map(|s| s.per_round.iter().filter(|r| r.0 >= 1).map(|r| r.1 as f64))
                    .collect();
                FederationSummary {
                    variant: run.name.clone(),
                    digest: run.digest.clone(),
                    rounds: run.rounds,
                    seconds: round4(run.seconds),
                    bytes,
                    mean_bytes_per_site_round: (!training.is_empty())
                        .then(|| training.iter().sum::<f64>() / training.len() as f64),
                }
            })
            .collect();
        let targets = targets(&horizons[0], federated);
        Self {
            settings: Settings {
                data: options.data.display().to_string(),
                rounds: options.rounds,
                epochs_per_round: options.epochs,
                baseline_epochs: options.baseline_epochs(),
                backbone: options.backbone,
                emr_only: options.emr_only,
                input_size: options.input_size,
                batch_size: options.batch_size,
                learning_rate: options.learning_rate,
                holdout: options.holdout,
                seed: options.seed,
                variants: options.variants.iter().map(Variant::name).collect(),
            },
            sites: sites
                .iter()
                .enumerate()
                .map(|(i, s)| SiteRow {
                    id: s.id.clone(),
                    cases: s.cases,
                    test_cases: evaluation.test_cases[i],
                    refused: evaluation.refused[i],
                })
                .collect(),
            horizons,
            federations,
            targets,
            seconds,
        }
    }

    /// The model result named `model` at `horizon`.
    pub fn result(&self, horizon: &str, model: &str) -> Option<&ModelResult> {
        self.horizons
            .iter()
            .find(|h| h.horizon == horizon)?
            .models
            .iter()
            .find(|m| m.model == model)
    }
}

/// The targets at 24 h: FedAvg (else the first variant) against
/// local-only and pooled; partial sharing against full sharing.
fn targets(h24: &HorizonResult, federated: &[FederatedRun]) -> Vec<Target> {
    let find = |model: &str| h24.models.iter().find(|m| m.model == model);
    let Some(main) = federated
        .iter()
        .find(|r| r.variant == Variant::Fedavg)
        .or_else(|| federated.first())
    else {
        return Vec::new();
    };
    let name = format!("federated {}", main.name);
    let (Some(fed), Some(local), Some(pooled)) = (find(&name), find("local-only"), find("pooled"))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |label: String, value: Option<f64>, goal: Option<f64>| {
        if let (Some(value), Some(goal)) = (value, goal) {
            out.push(Target {
                name: label,
                value: round4(value),
                goal: round4(goal),
                met: value >= goal - 1e-12,
            });
        }
    };
    push(
        format!("{name} mean AUC >= local-only mean AUC + 0.05"),
        fed.mean_auc,
        local.mean_auc.map(|l| l + 0.05),
    );
    push(
        format!("{name} mean AUC >= pooled mean AUC - 0.02"),
        fed.mean_auc,
        pooled.mean_auc.map(|p| p - 0.02),
    );
    push(
        format!("{name} generalisability >= local-only generalisability + 0.05"),
        fed.generalisability,
        local.generalisability.map(|l| l + 0.05),
    );
    for run in federated {
        if let Variant::Percentile { .. } = run.variant
            && main.variant == Variant::Fedavg
            && let Some(partial) = find(&format!("federated {}", run.name))
        {
            push(
                format!("federated {} mean AUC >= {name} mean AUC - 0.02", run.name),
                partial.mean_auc,
                fed.mean_auc.map(|f| f - 0.02),
            );
        }
    }
    out
}

fn cell(a: &SiteAuc) -> String {
    match (a.auc, a.ci_low, a.ci_high) {
        (Some(auc), Some(lo), Some(hi)) => format!("{auc:.3} ({lo:.3}–{hi:.3})"),
        _ => "n/a".to_owned(),
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or("n/a".to_owned(), |x| format!("{x:.3}"))
}

/// What the site-specific federated models of a horizon are, for the
/// Markdown (empty when none is).
fn site_specific_note(h: &HorizonResult) -> String {
    let names: Vec<&str> = h
        .models
        .iter()
        .filter(|m| m.kind == "federated" && m.site_specific)
        .map(|m| m.model.as_str())
        .collect();
    if names.is_empty() {
        return String::new();
    }
    format!(
        " {}: each site's model is its own — the global model with the tensors the site kept \
at home (its batch-norm statistics) overlaid, as `oxbox federate` uses it; per site, site i's \
model on its own test cases; generalisability, site i's model on the other sites' test cases \
(like a local-only model).",
        names.join(", ")
    )
}

/// The Markdown report.
pub fn markdown(report: &SimulationReport) -> String {
    let mut md = String::new();
    let s = &report.settings;
    let _ = writeln!(md, "# Federated simulation\n");
    let _ = writeln!(
        md,
        "{} sites, {} rounds × {} local epoch(s); {} model, input {}, batch {}, learning rate {}; \
{:.0} % of each site's cases held out for testing (no model trained on them); seed {}. \
Local-only and pooled models train {} epochs (the one with the best validation loss kept). \
AUC of P(level ≥ 1) with DeLong 95 % CI.\n",
        report.sites.len(),
        s.rounds,
        s.epochs_per_round,
        if s.emr_only {
            "EMR-only".to_owned()
        } else {
            format!("{:?} backbone", s.backbone).to_lowercase()
        },
        s.input_size,
        s.batch_size,
        s.learning_rate,
        s.holdout * 100.0,
        s.seed,
        s.baseline_epochs
    );
    let _ = writeln!(
        md,
        "| site | cases | test cases | refused |\n|---|---|---|---|"
    );
    for site in &report.sites {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            site.id, site.cases, site.test_cases, site.refused
        );
    }
    md.push('\n');
    for h in &report.horizons {
        let _ = writeln!(md, "## {} at {}\n", h.output, h.horizon);
        let _ = write!(md, "| site |");
        for m in &h.models {
            let _ = write!(md, " {} |", m.model);
        }
        let _ = write!(md, "\n|---|");
        for _ in &h.models {
            md.push_str("---|");
        }
        md.push('\n');
        for (i, site) in report.sites.iter().enumerate() {
            let _ = write!(md, "| {} |", site.id);
            for m in &h.models {
                let _ = write!(
                    md,
                    " {} |",
                    m.per_site.get(i).map_or("n/a".to_owned(), cell)
                );
            }
            md.push('\n');
        }
        let _ = write!(md, "| **mean AUC** |");
        for m in &h.models {
            let _ = write!(md, " **{}** |", opt(m.mean_auc));
        }
        let _ = write!(md, "\n| **generalisability** |");
        for m in &h.models {
            let _ = write!(md, " **{}** |", opt(m.generalisability));
        }
        let _ = writeln!(
            md,
            "\n\nGeneralisability: mean AUC on the other sites' test sets (a local-only model on \
every site but its own).{site_specific}\n\n![AUC per site {h}](auc-per-site-{h}.png) ![mean AUC and generalisability {h}](auc-summary-{h}.png)\n",
            h = h.horizon,
            site_specific = site_specific_note(h)
        );
    }
    let _ = writeln!(md, "## Bytes sent per site per round\n");
    for f in &report.federations {
        let _ = writeln!(
            md,
            "### {} ({} rounds, {:.0} s, final model `{}`)\n",
            f.variant,
            f.rounds,
            f.seconds,
            &f.digest[..f.digest.len().min(16)]
        );
        let _ = writeln!(md, "| site | per round (bytes) | total |\n|---|---|---|");
        for site in &f.bytes {
            let rounds: Vec<String> = site
                .per_round
                .iter()
                .map(|r| format!("r{}: {}", r.round, r.bytes))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                site.site,
                rounds.join(", "),
                site.total
            );
        }
        let _ = writeln!(
            md,
            "\nMean per site per training round: {}.\n",
            f.mean_bytes_per_site_round
                .map_or("n/a".to_owned(), |b| format!("{b:.0} bytes"))
        );
    }
    if !report.federations.is_empty() {
        let _ = writeln!(md, "![bytes per site per round](bytes-per-round.png)\n");
    }
    let _ = writeln!(
        md,
        "## Targets (24 h)\n\n| target | value | goal | met |\n|---|---|---|---|"
    );
    for t in &report.targets {
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.4} | {} |",
            t.name,
            t.value,
            t.goal,
            if t.met { "yes" } else { "**no**" }
        );
    }
    let t = &report.seconds;
    let _ = writeln!(
        md,
        "\nTime: federation {:.0} s, local-only and pooled training {:.0} s, evaluation {:.0} s, total {:.0} s.",
        t.federation, t.baselines, t.evaluation, t.total
    );
    md
}

/// Writes `report.json` and `report.md` into `dir`.
///
/// # Errors
/// [`SimulateError::Output`].
pub fn write(dir: &Path, report: &SimulationReport) -> Result<(), SimulateError> {
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    crate::output::write_bytes(&dir.join("report.json"), json.as_bytes())?;
    crate::output::write_bytes(&dir.join("report.md"), markdown(report).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalisability_leaves_out_each_models_own_site() {
        // Model i scores 0.9 on its own site and 0.6 elsewhere.
        let g = generalisability(3, |i, j| Some(if i == j { 0.9 } else { 0.6 }));
        assert!((g.unwrap_or(0.0) - 0.6).abs() < 1e-12);
        assert_eq!(generalisability(2, |_, _| None), None);
    }
}
