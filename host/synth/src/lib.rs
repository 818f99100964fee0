//! `oxbox synth`: a multi-site synthetic cohort with known truth.
//!
//! Per site, a folder with `site.toml` (its conventions and the plugin that
//! reads it), `cases.csv` (the EMR export in the site's own column names,
//! units, codes and missingness, with fake identifiers), `images/*.dcm`
//! (real DICOM files, differing by site as vendors do) and `labels.csv`
//! (oxygen level 0–4 at 24 h and 72 h); `truth.json` at the top holds the
//! label model and the Bayes-optimal AUC of every output, per site and
//! pooled. Deterministic for a seed, whatever the thread count.
//!
//! - [`cohort`]: sites, patients, EMR values and the label model;
//! - [`thorax`]: the synthetic radiograph;
//! - [`writer`]: DICOM encoding.

pub mod cohort;
pub mod thorax;
pub mod writer;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use cohort::{CaseMix, Convention, Patient, SHIFT_72H, SiteProfile, THRESHOLDS, syntax};
use oxbox_rng::Pcg;

/// Why a cohort could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The options are out of range.
    #[error("{0}")]
    Options(String),
    /// The output folder is not usable.
    #[error("{path}: {reason}")]
    Output {
        /// The folder.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing a file failed.
    #[error(transparent)]
    Write(#[from] oxbox_files::OutputError),
    /// DICOM encoding failed.
    #[error("DICOM: {0}")]
    Dicom(String),
    /// CSV writing failed.
    #[error("CSV: {0}")]
    Csv(String),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Number of sites (1–64).
    pub sites: usize,
    /// Mean cases per site (sites range 0.7×–1.3×; site 1 exactly).
    pub cases_per_site: usize,
    /// Exact cases of each site, in order (overrides `sites` and
    /// `cases_per_site`; the label model and the sites' other parameters
    /// stay those of their index): unequal sites for federation studies.
    pub site_sizes: Option<Vec<usize>>,
    /// Each site's case mix, in order (one per site; `None`: every site
    /// [`CaseMix::General`], the cohort `oxbox synth` always wrote): a
    /// non-IID cohort whose sites see different slices of the population
    /// under the same label model.
    pub site_mixes: Option<Vec<CaseMix>>,
    /// Write no radiographs (`image_file` empty): a cohort for EMR-only
    /// models, written in seconds (the labels and EMR values are the same
    /// as with images).
    pub no_images: bool,
    /// The radiographs' longer side at most this many pixels (`None`: each
    /// scanner's own, 1024–3000): small images for quick cohorts (tests,
    /// demos), rendered and read many times faster. Everything else —
    /// anatomy, opacities, transfer syntaxes, labels, EMR — is what the
    /// same seed gives without it.
    pub max_image_side: Option<u32>,
    /// The seed.
    pub seed: u64,
    /// The output folder (created; must be empty or absent).
    pub out: PathBuf,
}

impl SynthOptions {
    /// The number of sites: `site_sizes`' length when given.
    pub fn site_count(&self) -> usize {
        self.site_sizes.as_ref().map_or(self.sites, Vec::len)
    }

    /// The mean site size the profiles are drawn around.
    fn mean_cases(&self) -> usize {
        match &self.site_sizes {
            Some(sizes) if !sizes.is_empty() => (sizes.iter().sum::<usize>() / sizes.len()).max(1),
            _ => self.cases_per_site,
        }
    }

    /// Every site's profile (sizes from `site_sizes` when given).
    pub fn profiles(&self) -> Vec<SiteProfile> {
        let mean = self.mean_cases();
        (0..self.site_count())
            .map(|i| {
                let mut profile = cohort::site_profile(i, mean);
                if let Some(size) = self.site_sizes.as_ref().and_then(|s| s.get(i)) {
                    profile.cases = *size;
                }
                if let Some(mix) = self.site_mixes.as_ref().and_then(|m| m.get(i)) {
                    mix.apply(&mut profile);
                }
                profile
            })
            .collect()
    }
}

/// Bayes-optimal AUCs at one horizon.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HorizonAuc {
    /// P(level ≥ 1).
    pub p_o2_any: Option<f64>,
    /// P(level ≥ 2).
    pub p_o2_high_flow_or_niv: Option<f64>,
    /// P(level ≥ 3).
    pub p_ventilation_or_death: Option<f64>,
}

/// Bayes-optimal AUCs at both horizons.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BayesAuc {
    /// Within 24 h.
    #[serde(rename = "24h")]
    pub h24: HorizonAuc,
    /// Within 72 h.
    #[serde(rename = "72h")]
    pub h72: HorizonAuc,
}

/// One site in `truth.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SiteTruth {
    /// `site-N`.
    pub id: String,
    /// Cases.
    pub cases: usize,
    /// EMR convention.
    pub convention: &'static str,
    /// The plugin that reads it.
    pub plugin: &'static str,
    /// Case mix (only with `--site-mixes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case_mix: Option<&'static str>,
    /// Mean latent severity.
    pub severity_mean: f64,
    /// σ of the latent severity (only with `--site-mixes`; else 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity_sd: Option<f64>,
    /// σ of the label noise.
    pub label_noise: f64,
    /// Lab missingness.
    pub missing_rate: f64,
    /// Share of cases at level ≥ 1 within 24 h, in this cohort.
    pub prevalence_o2_any_24h: f64,
    /// Bayes-optimal AUC on the site's population (Monte Carlo, 200 000
    /// draws).
    pub bayes_auc: BayesAuc,
    /// AUC of the Bayes-optimal score on this cohort's own cases.
    pub bayes_auc_in_sample: BayesAuc,
}

/// `truth.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Truth {
    /// The seed.
    pub seed: u64,
    /// The label model in words.
    pub label_model: &'static str,
    /// τ₁…τ₄.
    pub thresholds: [f64; 4],
    /// δ for 72 h.
    pub shift_72h: f64,
    /// Per site.
    pub sites: Vec<SiteTruth>,
    /// All sites pooled (weighted by size), population.
    pub pooled_bayes_auc: BayesAuc,
    /// All sites pooled, on this cohort's cases.
    pub pooled_bayes_auc_in_sample: BayesAuc,
}

const LABEL_MODEL: &str = "severity s ~ N(site severity_mean, 1); course z = s + e, e ~ N(0, site label_noise^2); \
level_24h = #{k: z > thresholds[k]}, level_72h = #{k: z + shift_72h > thresholds[k]}; \
Bayes-optimal score P(level_h >= k | s, site) = Phi((s + shift_h - thresholds[k-1]) / label_noise)";

/// The same label model, for cohorts with `--site-mixes`: only the
/// severity's spread is the site's (its case mix).
const LABEL_MODEL_MIXES: &str = "severity s ~ N(site severity_mean, site severity_sd^2) (the site's case mix); course z = s + e, e ~ N(0, site label_noise^2); \
level_24h = #{k: z > thresholds[k]}, level_72h = #{k: z + shift_72h > thresholds[k]}; \
Bayes-optimal score P(level_h >= k | s, site) = Phi((s + shift_h - thresholds[k-1]) / label_noise)";

/// One patient as the truth computation sees it.
#[derive(Debug, Clone, Copy)]
struct Draw {
    severity: f64,
    label_noise: f64,
    level_24h: u8,
    level_72h: u8,
}

/// The AUC of the Bayes-optimal score P(level ≥ k | s, site) for every
/// output over `draws` (a site's population, or its cases).
fn auc_for(draws: &[Draw]) -> BayesAuc {
    let horizon = |shift: f64, at_72h: bool| {
        let out = |k: usize| {
            let scores: Vec<f64> = draws
                .iter()
                .map(|d| {
                    oxbox_metrics::normal_cdf((d.severity + shift - THRESHOLDS[k]) / d.label_noise)
                })
                .collect();
            let labels: Vec<bool> = draws
                .iter()
                .map(|d| if at_72h { d.level_72h } else { d.level_24h } > k as u8)
                .collect();
            oxbox_metrics::auc(&scores, &labels).map(|a| (a * 1e4).round() / 1e4)
        };
        HorizonAuc {
            p_o2_any: out(0),
            p_o2_high_flow_or_niv: out(1),
            p_ventilation_or_death: out(2),
        }
    };
    BayesAuc {
        h24: horizon(0.0, false),
        h72: horizon(SHIFT_72H, true),
    }
}

fn population(site: &SiteProfile, draws: usize, seed: u64) -> Vec<Draw> {
    let mut rng = Pcg::new(seed ^ 0x0074_7275_7468, site.index as u64);
    (0..draws)
        .map(|_| {
            let s = rng.gauss(site.severity_mean, site.severity_sd);
            let z = s + rng.gauss(0.0, site.label_noise);
            Draw {
                severity: s,
                label_noise: site.label_noise,
                level_24h: cohort::level(z),
                level_72h: cohort::level(z + SHIFT_72H),
            }
        })
        .collect()
}

/// Generates the cohort; `progress` is called once per finished case.
///
/// # Errors
/// [`SynthError`].
pub fn generate(options: &SynthOptions, progress: &(dyn Fn() + Sync)) -> Result<Truth, SynthError> {
    if !(1..=64).contains(&options.site_count()) {
        return Err(SynthError::Options(format!(
            "--sites {}: between 1 and 64",
            options.site_count()
        )));
    }
    if let Some(size) = options
        .site_sizes
        .iter()
        .flatten()
        .find(|s| !(1..=100_000).contains(*s))
    {
        return Err(SynthError::Options(format!(
            "--site-sizes: {size} cases; every site between 1 and 100000"
        )));
    }
    if let Some(mixes) = &options.site_mixes
        && mixes.len() != options.site_count()
    {
        return Err(SynthError::Options(format!(
            "--site-mixes: {} mix(es) for {} sites; give one per site",
            mixes.len(),
            options.site_count()
        )));
    }
    if let Some(side) = options.max_image_side
        && !(MIN_IMAGE_SIDE..=MAX_IMAGE_SIDE).contains(&side)
    {
        return Err(SynthError::Options(format!(
            "--max-image-side {side}: between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels"
        )));
    }
    if !(1..=100_000).contains(&options.cases_per_site) {
        return Err(SynthError::Options(format!(
            "--cases-per-site {}: between 1 and 100000",
            options.cases_per_site
        )));
    }
    prepare_output(&options.out)?;
    let profiles: Vec<SiteProfile> = options.profiles();
    let mixed = options.site_mixes.is_some();
    let mut sites = Vec::new();
    let mut pooled_population = Vec::new();
    let mut pooled_sample = Vec::new();
    for site in &profiles {
        let dir = options.out.join(&site.id);
        let images = dir.join("images");
        let folder = if options.no_images { &dir } else { &images };
        std::fs::create_dir_all(folder).map_err(|e| SynthError::Output {
            path: images.display().to_string(),
            reason: e.to_string(),
        })?;
        let patients: Vec<Patient> = (0..site.cases)
            .map(|i| {
                let mut rng = Pcg::new(options.seed, ((site.index as u64) << 32) | i as u64);
                cohort::sample_patient(site, i + 1, &mut rng)
            })
            .collect();
        patients
            .par_iter()
            .enumerate()
            .try_for_each(|(i, patient)| {
                let mut rng = Pcg::new(
                    options.seed ^ 0x0069_6d61_6765,
                    ((site.index as u64) << 32) | i as u64,
                );
                if !options.no_images {
                    write_case_image(site, patient, &images, options.max_image_side, &mut rng)?;
                }
                progress();
                Ok::<(), SynthError>(())
            })?;
        write_cases_csv(site, &patients, !options.no_images, &dir.join("cases.csv"))?;
        write_labels_csv(&patients, &dir.join("labels.csv"))?;
        write_site_toml(site, &dir.join("site.toml"))?;

        let sample: Vec<_> = patients
            .iter()
            .map(|p| Draw {
                severity: p.severity,
                label_noise: site.label_noise,
                level_24h: p.level_24h,
                level_72h: p.level_72h,
            })
            .collect();
        let draws = population(
            site,
            200_000 * site.cases / options.mean_cases(),
            options.seed,
        );
        sites.push(SiteTruth {
            id: site.id.clone(),
            cases: site.cases,
            convention: site.convention.as_str(),
            plugin: site.convention.plugin(),
            case_mix: mixed.then(|| site.mix.as_str()),
            severity_mean: (site.severity_mean * 1e4).round() / 1e4,
            severity_sd: mixed.then_some(site.severity_sd),
            label_noise: (site.label_noise * 1e4).round() / 1e4,
            missing_rate: (site.missing_rate * 1e4).round() / 1e4,
            prevalence_o2_any_24h: (patients.iter().filter(|p| p.level_24h >= 1).count() as f64
                / site.cases as f64
                * 1e4)
                .round()
                / 1e4,
            bayes_auc: auc_for(&draws),
            bayes_auc_in_sample: auc_for(&sample),
        });
        pooled_population.extend(draws);
        pooled_sample.extend(sample);
    }
    let truth = Truth {
        seed: options.seed,
        label_model: if mixed {
            LABEL_MODEL_MIXES
        } else {
            LABEL_MODEL
        },
        thresholds: THRESHOLDS,
        shift_72h: SHIFT_72H,
        sites,
        pooled_bayes_auc: auc_for(&pooled_population),
        pooled_bayes_auc_in_sample: auc_for(&pooled_sample),
    };
    let text = serde_json::to_string_pretty(&truth)
        .map_err(|e| SynthError::Csv(format!("truth.json: {e}")))?;
    write_file(&options.out.join("truth.json"), text.as_bytes())?;
    Ok(truth)
}

fn prepare_output(out: &Path) -> Result<(), SynthError> {
    let bad = |reason: String| SynthError::Output {
        path: out.display().to_string(),
        reason,
    };
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(bad(
                    "exists and is not empty; choose a new --out (a cohort is never mixed with old files)"
                        .to_owned(),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| bad(e.to_string()))
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The image file of a case.
pub fn image_file(patient: &Patient) -> String {
    format!("images/{}.dcm", patient.case_id)
}

/// The smallest and largest `--max-image-side` (the scanners' longest
/// side is 3000).
pub const MIN_IMAGE_SIDE: u32 = 64;
/// See [`MIN_IMAGE_SIDE`].
pub const MAX_IMAGE_SIDE: u32 = 4096;

fn write_case_image(
    site: &SiteProfile,
    patient: &Patient,
    images: &Path,
    max_side: Option<u32>,
    rng: &mut Pcg,
) -> Result<(), SynthError> {
    let scanner = &site.scanner;
    let long = scanner.side.0 + rng.below((scanner.side.1 - scanner.side.0 + 1) as usize) as u32;
    // Capped after the draw, so that every later draw is the same.
    let long = max_side.map_or(long, |max| long.min(max));
    let aspect = rng.range(0.85, 1.0);
    let (width, height) = if rng.chance(0.5) {
        (long as usize, (f64::from(long) * aspect) as usize)
    } else {
        ((f64::from(long) * aspect) as usize, long as usize)
    };
    let attenuation = thorax::render(
        width,
        height,
        thorax::ThoraxParams {
            severity: patient.severity,
            heel: scanner.heel,
        },
        rng,
    );
    let stored = writer::stored_values(&attenuation, scanner);
    let transfer_syntax = if rng.chance(0.25) {
        syntax::EXPLICIT_LE
    } else {
        scanner.transfer_syntax
    };
    let path = images.join(format!("{}.dcm", patient.case_id));
    writer::write_image(
        &path,
        patient,
        scanner,
        transfer_syntax,
        width,
        height,
        &stored,
        rng,
    )
}

/// Columns of the example site's export (see `plugins/example-site`).
const EXAMPLE_COLUMNS: [&str; 26] = [
    "MRN",
    "ENCOUNTER_ID",
    "PT_NAME",
    "DOB",
    "ARRIVAL_TS",
    "ACCESSION",
    "AGE",
    "GENDER",
    "TEMP_F",
    "PULSE",
    "RESP",
    "BP",
    "O2SAT",
    "O2_DELIVERY",
    "CRP",
    "DDIMER",
    "LDH",
    "PCT",
    "TROP_T",
    "WBC",
    "LYMPH_PCT",
    "NEUT_PCT",
    "CREAT",
    "GLUC",
    "FERRITIN",
    "NA",
];
/// Identifier columns of canonical-convention sites.
const CANONICAL_IDENTIFIERS: [&str; 3] = ["patient_name", "patient_id", "birth_date"];
/// Columns a `canonical-other-units` site writes in another unit.
const OTHER_UNITS: [(&str, &str); 5] = [
    ("temperature_c", "°F"),
    ("crp_mg_l", "mg/dL"),
    ("d_dimer_ng_ml_feu", "ng/mL DDU"),
    ("creatinine_mg_dl", "umol/L"),
    ("glucose_mg_dl", "mmol/L"),
];

/// The identifier columns of a convention (structural columns `case_id`
/// and `image_file` come first in every `cases.csv`).
pub fn identifier_columns(convention: Convention) -> &'static [&'static str] {
    match convention {
        Convention::ExampleSite => &EXAMPLE_COLUMNS[..6],
        _ => &CANONICAL_IDENTIFIERS,
    }
}

/// A canonical value in `unit` (all conversions the schema knows are
/// affine: invert from two points).
fn from_canonical(name: &str, value: f64, unit: &str) -> f64 {
    let Some(spec) = oxbox_emr_schema::feature(name) else {
        return value;
    };
    let at = |x: f64| oxbox_emr_schema::to_canonical(spec, x, Some(unit)).unwrap_or(x);
    let (b, a) = (at(0.0), at(1.0) - at(0.0));
    if a == 0.0 { value } else { (value - b) / a }
}

fn text(value: Option<f64>, digits: usize) -> String {
    value.map(|v| format!("{v:.digits$}")).unwrap_or_default()
}

fn write_cases_csv(
    site: &SiteProfile,
    patients: &[Patient],
    images: bool,
    path: &Path,
) -> Result<(), SynthError> {
    let csv_error = |e: csv::Error| SynthError::Csv(format!("{}: {e}", path.display()));
    let mut out = csv::Writer::from_writer(Vec::new());
    let names: Vec<&str> = oxbox_emr_schema::FEATURES.iter().map(|f| f.name).collect();
    let mut header = vec!["case_id".to_owned(), "image_file".to_owned()];
    match site.convention {
        Convention::ExampleSite => header.extend(EXAMPLE_COLUMNS.iter().map(|c| (*c).to_owned())),
        Convention::Canonical | Convention::CanonicalOtherUnits => {
            header.extend(CANONICAL_IDENTIFIERS.iter().map(|c| (*c).to_owned()));
            for name in &names {
                let unit = OTHER_UNITS.iter().find(|(n, _)| n == name);
                header.push(match (site.convention, unit) {
                    (Convention::CanonicalOtherUnits, Some((_, unit))) => {
                        format!("{name} [{unit}]")
                    }
                    _ => (*name).to_owned(),
                });
            }
        }
    }
    out.write_record(&header).map_err(csv_error)?;
    for p in patients {
        let v = |name: &str| names.iter().position(|n| *n == name).and_then(|i| p.emr[i]);
        let image = if images { image_file(p) } else { String::new() };
        let mut row = vec![p.case_id.clone(), image];
        match site.convention {
            Convention::ExampleSite => {
                let wbc = v("wbc_e9_l");
                let percent = |name: &str| match (v(name), wbc) {
                    (Some(x), Some(w)) if w > 0.0 => Some(100.0 * x / w),
                    _ => None,
                };
                let unit = |name: &str, unit: &str| v(name).map(|x| from_canonical(name, x, unit));
                let bp = match (v("systolic_bp_mmhg"), v("diastolic_bp_mmhg")) {
                    (Some(s), Some(d)) => format!("{s:.0}/{d:.0}"),
                    _ => String::new(),
                };
                let device = match v("o2_device_at_triage").map(|d| d as u8) {
                    Some(0) => "RA",
                    Some(1) => "NC",
                    Some(2) => "HFNC",
                    Some(_) => "VENT",
                    None => "",
                };
                let sex = match v("sex") {
                    Some(s) if s > 0.5 => "M",
                    Some(_) => "F",
                    None => "U",
                };
                let birth = &p.birth_date;
                row.extend([
                    p.patient_id.replace("FAKE-", "FAKE-MRN-"),
                    format!("E-{}", &p.case_id[5..]),
                    p.name.clone(),
                    format!("{}-{}-{}", &birth[..4], &birth[4..6], &birth[6..]),
                    "2020-04-01T10:00".to_owned(),
                    format!("FAKEACC{}", &p.case_id[5..]),
                    text(v("age_years"), 0),
                    sex.to_owned(),
                    text(unit("temperature_c", "°F"), 1),
                    text(v("heart_rate_bpm"), 0),
                    text(v("resp_rate_bpm"), 0),
                    bp,
                    text(v("spo2_pct"), 0),
                    device.to_owned(),
                    text(unit("crp_mg_l", "mg/dL"), 2),
                    text(unit("d_dimer_ng_ml_feu", "ng/mL DDU"), 0),
                    text(v("ldh_u_l"), 0),
                    text(v("procalcitonin_ng_ml"), 2),
                    text(unit("troponin_t_ng_l", "ng/mL"), 3),
                    text(v("wbc_e9_l"), 1),
                    text(percent("lymphocytes_e9_l"), 1),
                    text(percent("neutrophils_e9_l"), 1),
                    text(unit("creatinine_mg_dl", "umol/L"), 0),
                    text(unit("glucose_mg_dl", "mmol/L"), 1),
                    text(v("ferritin_ng_ml"), 0),
                    text(v("sodium_mmol_l"), 0),
                ]);
            }
            Convention::Canonical | Convention::CanonicalOtherUnits => {
                row.extend([p.name.clone(), p.patient_id.clone(), p.birth_date.clone()]);
                for (i, name) in names.iter().enumerate() {
                    let other = OTHER_UNITS.iter().find(|(n, _)| n == name);
                    row.push(match (site.convention, other) {
                        (Convention::CanonicalOtherUnits, Some((_, unit))) => {
                            text(p.emr[i].map(|x| from_canonical(name, x, unit)), 2)
                        }
                        _ => text(p.emr[i], 2),
                    });
                }
            }
        }
        out.write_record(&row).map_err(csv_error)?;
    }
    let bytes = out
        .into_inner()
        .map_err(|e| SynthError::Csv(format!("{}: {e}", path.display())))?;
    write_file(path, &bytes)
}

fn write_labels_csv(patients: &[Patient], path: &Path) -> Result<(), SynthError> {
    let mut text = String::from("case_id,o2_level_24h,o2_level_72h\n");
    for p in patients {
        text.push_str(&format!("{},{},{}\n", p.case_id, p.level_24h, p.level_72h));
    }
    write_file(path, text.as_bytes())
}

fn write_site_toml(site: &SiteProfile, path: &Path) -> Result<(), SynthError> {
    let ids: Vec<String> = identifier_columns(site.convention)
        .iter()
        .map(|c| format!("{c:?}"))
        .collect();
    let text = format!(
        "# A synthetic site written by `oxbox synth`.\n\
[site]\nid = \"{id}\"\nconvention = \"{convention}\"\n\
# The plugin that maps cases.csv to the canonical schema, by name: found in\n\
# --plugins-dir, the configured [[plugins]], this folder's plugins/<name>, then\n\
# the oxbox installation's plugins/dist/<name> (never the working directory).\n\
plugin = \"{plugin}\"\ncases = {cases}\n\
# cases.csv: case_id and image_file first, then these identifier columns\n\
# (fake, for privacy tests; never passed to plugins or models), then the EMR.\n\
identifier_columns = [{ids}]\n\n\
[scanner]\nmodality = \"{modality}\"\nphotometric = \"{photometric}\"\nbits_stored = {bits}\n\
manufacturer = \"{manufacturer}\"\ntransfer_syntax = \"{syntax}\"\nwindow_tags = {window}\n",
        id = site.id,
        convention = site.convention.as_str(),
        plugin = site.convention.plugin(),
        cases = site.cases,
        ids = ids.join(", "),
        modality = site.scanner.modality,
        photometric = if site.scanner.monochrome1 {
            "MONOCHROME1"
        } else {
            "MONOCHROME2"
        },
        bits = site.scanner.bits_stored,
        manufacturer = site.scanner.manufacturer,
        syntax = site.scanner.transfer_syntax,
        window = site.scanner.window_tags,
    );
    write_file(path, text.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    Ok(oxbox_files::write_bytes(path, bytes)?)
}
