//! The cohort's statistical model: site profiles (non-IID), patients with a
//! latent severity, EMR values that follow it with realistic correlations,
//! and the documented ordinal label model whose Bayes-optimal AUCs are
//! known.
//!
//! Label model (also written to `truth.json`): each patient has a latent
//! severity s ~ N(μ_site, 1). At triage an unobserved deviation
//! ε ~ N(0, σ_site²) (the site's label noise) decides the course:
//! z = s + ε; the oxygen level within 24 h is the number of thresholds
//! τ = (0.2, 1.3, 2.1, 2.9) that z exceeds (0 room air … 4 death), and
//! within 72 h the number that z + 0.5 exceeds (so level72 ≥ level24).
//! Hence P(level_h ≥ k | s, site) = Φ((s + δ_h − τ_k) / σ_site), δ_24 = 0,
//! δ_72 = 0.5: a model that knew s and the site exactly would score with
//! that probability, and its AUC is the Bayes-optimal AUC. Everything a
//! model can see — the EMR values and the radiograph's opacities — is a
//! noisy function of s.

use oxbox_rng::Pcg;

/// Thresholds on the latent course for levels ≥ 1, ≥ 2, ≥ 3, ≥ 4.
pub const THRESHOLDS: [f64; 4] = [0.2, 1.3, 2.1, 2.9];
/// Shift of the latent course between 24 h and 72 h.
pub const SHIFT_72H: f64 = 0.5;

/// How a site writes its EMR export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// Canonical field names and units (the `canonical` plugin reads it).
    Canonical,
    /// Canonical field names, some columns in other units, named
    /// `field [unit]` (the `canonical` plugin converts them).
    CanonicalOtherUnits,
    /// Exactly the convention of `plugins/example-site`.
    ExampleSite,
}

impl Convention {
    /// The name written to `site.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Convention::Canonical => "canonical",
            Convention::CanonicalOtherUnits => "canonical-other-units",
            Convention::ExampleSite => "example-site",
        }
    }

    /// The plugin that maps this convention (`plugins/dist/<name>`).
    pub fn plugin(self) -> &'static str {
        match self {
            Convention::Canonical | Convention::CanonicalOtherUnits => "canonical",
            Convention::ExampleSite => "example-site",
        }
    }
}

/// DICOM conventions of a site's X-ray equipment.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// "CR" or "DX".
    pub modality: &'static str,
    /// Whether pixels are stored inverted (MONOCHROME1).
    pub monochrome1: bool,
    /// Bits Stored (10–16).
    pub bits_stored: u16,
    /// Range of the image's longer side, pixels.
    pub side: (u32, u32),
    /// Whether Window Center/Width are written.
    pub window_tags: bool,
    /// The transfer syntax most images use; a quarter use explicit VR LE.
    pub transfer_syntax: &'static str,
    /// Manufacturer, as written in the files.
    pub manufacturer: &'static str,
    /// Strength of the heel-effect gradient.
    pub heel: f64,
}

/// One site of the cohort.
#[derive(Debug, Clone)]
pub struct SiteProfile {
    /// `site-N`.
    pub id: String,
    /// 0-based index.
    pub index: usize,
    /// Cases at this site.
    pub cases: usize,
    /// EMR convention.
    pub convention: Convention,
    /// Mean latent severity (prevalence).
    pub severity_mean: f64,
    /// Spread (σ) of the latent severity among the site's patients: 1 for
    /// a general hospital, less for a site that sees a narrow slice.
    pub severity_sd: f64,
    /// Mean age, years.
    pub age_mean: f64,
    /// σ of the label noise.
    pub label_noise: f64,
    /// Probability that a lab value is missing (vitals: a third of it).
    pub missing_rate: f64,
    /// Probability that each EMR feature is missing, in schema order
    /// (derived from `missing_rate`, then from the case mix).
    pub missing: [f64; 21],
    /// Who comes through the site's door.
    pub mix: CaseMix,
    /// X-ray equipment.
    pub scanner: Scanner,
}

/// Transfer syntaxes the synthetic images use.
pub mod syntax {
    /// Explicit VR little endian.
    pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    /// Implicit VR little endian.
    pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    /// Deflated explicit VR little endian.
    pub const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    /// RLE lossless.
    pub const RLE: &str = "1.2.840.10008.1.2.5";
    /// JPEG-LS lossless.
    pub const JPEG_LS: &str = "1.2.840.10008.1.2.4.80";
}

/// Golden-ratio low-discrepancy fraction for site `i` and a salt: spreads
/// site parameters evenly without a table per site count.
fn spread(i: usize, salt: f64) -> f64 {
    ((i as f64 + 1.0) * 0.618_033_988_75 + salt).fract()
}

/// The profile of site `index` of a cohort with `cases_per_site` cases per
/// site on average (sites range from 0.7× to 1.3×; site 1 has exactly the
/// average).
pub fn site_profile(index: usize, cases_per_site: usize) -> SiteProfile {
    let convention = match index {
        0 => Convention::Canonical,
        1 => Convention::ExampleSite,
        i if i % 2 == 0 => Convention::CanonicalOtherUnits,
        _ => Convention::ExampleSite,
    };
    let size = if index == 0 {
        1.0
    } else {
        0.7 + 0.6 * spread(index, 0.11)
    };
    let scanners = [
        (
            "CR",
            true,
            12,
            (1760, 2140),
            true,
            syntax::EXPLICIT_LE,
            "Acme Radiography",
        ),
        (
            "DX",
            false,
            14,
            (2500, 3000),
            true,
            syntax::JPEG_LS,
            "Borealis Imaging",
        ),
        (
            "CR",
            false,
            10,
            (1024, 1400),
            false,
            syntax::RLE,
            "Cobalt Medical",
        ),
        (
            "DX",
            true,
            16,
            (2000, 2500),
            true,
            syntax::IMPLICIT_LE,
            "Delta X-Ray",
        ),
        (
            "DX",
            false,
            15,
            (1400, 1800),
            false,
            syntax::DEFLATED,
            "Eon Diagnostics",
        ),
    ];
    let (modality, monochrome1, bits_stored, side, window_tags, transfer_syntax, manufacturer) =
        scanners[index % scanners.len()];
    let missing_rate = 0.04 + 0.2 * spread(index, 0.53);
    SiteProfile {
        id: format!("site-{}", index + 1),
        index,
        cases: ((cases_per_site as f64) * size).round().max(1.0) as usize,
        convention,
        severity_mean: -0.45 + 0.9 * spread(index, 0.0),
        severity_sd: 1.0,
        age_mean: 52.0 + 14.0 * spread(index, 0.37),
        label_noise: 0.45 + 0.35 * spread(index, 0.71),
        missing_rate,
        missing: std::array::from_fn(|i| missingness(i, missing_rate)),
        mix: CaseMix::General,
        scanner: Scanner {
            modality,
            monochrome1,
            bits_stored,
            side,
            window_tags,
            transfer_syntax,
            manufacturer,
            heel: 0.04 + 0.08 * spread(index, 0.29),
        },
    }
}

/// How often feature `i` (schema order) is missing at a site whose labs
/// are missing at `lab_rate`: age and sex always recorded, vitals and the
/// oxygen device at a third of the lab rate, labs at the lab rate.
fn missingness(i: usize, lab_rate: f64) -> f64 {
    match i {
        0 | 1 => 0.0,
        2..=8 => lab_rate / 3.0,
        _ => lab_rate,
    }
}

/// Schema indices of the basic labs every emergency department runs (CRP,
/// white cells, lymphocytes, neutrophils, creatinine, glucose, sodium).
const BASIC_LABS: [usize; 7] = [9, 14, 15, 16, 17, 18, 20];
/// Schema indices of the extended panel (D-dimer, LDH, procalcitonin,
/// troponin T, ferritin): what a small hospital often does not order.
const EXTENDED_LABS: [usize; 5] = [10, 11, 12, 13, 19];

/// A site's case mix: which slice of the patient population comes through
/// its door and which tests it records. It changes only the population a
/// site draws from (severity, age, missingness); the label model — how
/// the oxygen level follows from the severity — is the same everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaseMix {
    /// The site's own profile (its index's prevalence, age, missingness):
    /// what `oxbox synth` writes without `--site-mixes`.
    #[default]
    General,
    /// A community hospital: milder, younger patients (severity
    /// N(−0.5, 0.6²), mean age 47), basic labs only (the extended panel
    /// missing 90 %).
    Community,
    /// A tertiary referral centre: sicker, older patients (severity
    /// N(0.8, 0.6²), mean age 65), the full lab panel (3 % missing, vitals
    /// 1 %).
    Referral,
    /// An urgent-care or field site whose export carries no lab results at
    /// all (every lab missing); patients a little milder than average
    /// (severity N(−0.2, 0.8²)).
    VitalsOnly,
}

impl CaseMix {
    /// Every mix, for help texts.
    pub const ALL: [CaseMix; 4] = [
        CaseMix::General,
        CaseMix::Community,
        CaseMix::Referral,
        CaseMix::VitalsOnly,
    ];

    /// The command-line and `truth.json` name.
    pub fn as_str(self) -> &'static str {
        match self {
            CaseMix::General => "general",
            CaseMix::Community => "community",
            CaseMix::Referral => "referral",
            CaseMix::VitalsOnly => "vitals-only",
        }
    }

    /// Applies the mix to a site's profile (its size, convention, scanner
    /// and label noise stay).
    pub fn apply(self, site: &mut SiteProfile) {
        site.mix = self;
        match self {
            CaseMix::General => {}
            CaseMix::Community => {
                site.severity_mean = -0.5;
                site.severity_sd = 0.6;
                site.age_mean = 47.0;
                for i in EXTENDED_LABS {
                    site.missing[i] = 0.9;
                }
            }
            CaseMix::Referral => {
                site.severity_mean = 0.8;
                site.severity_sd = 0.6;
                site.age_mean = 65.0;
                site.missing_rate = 0.03;
                site.missing = std::array::from_fn(|i| missingness(i, 0.03));
            }
            CaseMix::VitalsOnly => {
                site.severity_mean = -0.2;
                site.severity_sd = 0.8;
                site.missing_rate = 1.0;
                for i in BASIC_LABS.into_iter().chain(EXTENDED_LABS) {
                    site.missing[i] = 1.0;
                }
            }
        }
    }
}

impl std::str::FromStr for CaseMix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        CaseMix::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = CaseMix::ALL.iter().map(|m| m.as_str()).collect();
                format!("{text:?}: a case mix is one of {}", names.join(", "))
            })
    }
}

/// One synthetic patient.
#[derive(Debug, Clone)]
pub struct Patient {
    /// `case-00001`.
    pub case_id: String,
    /// Latent severity.
    pub severity: f64,
    /// The deviation that decides the course.
    pub course_noise: f64,
    /// Canonical EMR values (schema order; `None` = missing).
    pub emr: [Option<f64>; 21],
    /// Oxygen level within 24 h (0–4).
    pub level_24h: u8,
    /// Oxygen level within 72 h (0–4).
    pub level_72h: u8,
    /// Fake patient name (DICOM PN).
    pub name: String,
    /// Fake patient id.
    pub patient_id: String,
    /// Fake birth date, YYYYMMDD.
    pub birth_date: String,
}

/// The oxygen level a latent course reaches.
pub fn level(course: f64) -> u8 {
    THRESHOLDS.iter().filter(|&&t| course > t).count() as u8
}

const SURNAMES: [&str; 12] = [
    "DOE", "ROE", "MOE", "POE", "LOE", "COE", "HOE", "FOE", "TOE", "VOE", "WOE", "ZOE",
];
const GIVEN: [&str; 10] = [
    "JANE", "JOHN", "ALEX", "SAM", "RIVER", "ROBIN", "TAYLOR", "JORDAN", "CASEY", "MORGAN",
];

/// Samples patient `number` (1-based) of `site` from its own stream.
pub fn sample_patient(site: &SiteProfile, number: usize, rng: &mut Pcg) -> Patient {
    let s = rng.gauss(site.severity_mean, site.severity_sd);
    let course_noise = rng.gauss(0.0, site.label_noise);
    let round = |v: f64, digits: i32| {
        let f = 10f64.powi(digits);
        (v * f).round() / f
    };
    let age = rng
        .gauss(site.age_mean + 5.0 * s, 13.0)
        .clamp(18.0, 98.0)
        .round();
    let sex = if rng.chance(0.56) { 1.0 } else { 0.0 };
    let temperature = round(
        (37.3 + 0.45 * s + rng.gauss(0.0, 0.45)).clamp(35.0, 41.5),
        1,
    );
    let heart = (88.0 + 9.0 * s + rng.gauss(0.0, 11.0))
        .clamp(45.0, 170.0)
        .round();
    let resp = (19.0 + 3.2 * s + rng.gauss(0.0, 2.5))
        .clamp(10.0, 45.0)
        .round();
    let systolic = (128.0 - 4.0 * s + rng.gauss(0.0, 16.0))
        .clamp(80.0, 210.0)
        .round();
    let diastolic = (0.6 * systolic + rng.gauss(0.0, 8.0))
        .clamp(40.0, systolic - 10.0)
        .round();
    let spo2 = (96.0 - 3.0 * s + rng.gauss(0.0, 1.5))
        .clamp(65.0, 100.0)
        .round();
    let device = if s > 2.2 && rng.chance(0.4) {
        2.0
    } else if spo2 < 88.0 && rng.chance(0.6) {
        1.0
    } else {
        0.0
    };
    let lognormal = |rng: &mut Pcg, mu: f64, sd: f64| (mu + rng.gauss(0.0, sd)).exp();
    let crp = round(lognormal(rng, 3.4 + 0.65 * s, 0.5).clamp(0.5, 500.0), 1);
    let d_dimer = lognormal(rng, 6.7 + 0.45 * s, 0.5)
        .clamp(100.0, 20_000.0)
        .round();
    let ldh = lognormal(rng, 5.75 + 0.25 * s, 0.18)
        .clamp(100.0, 2_000.0)
        .round();
    let pct = round(lognormal(rng, -2.3 + 0.4 * s, 0.8).clamp(0.01, 50.0), 2);
    let troponin = lognormal(rng, 2.3 + 0.25 * s + 0.02 * (age - 60.0), 0.7)
        .clamp(1.0, 2_000.0)
        .round();
    let wbc = round(lognormal(rng, 1.95 + 0.08 * s, 0.3).clamp(1.0, 40.0), 1);
    let lymph = round(
        lognormal(rng, 0.05 - 0.28 * s, 0.3).clamp(0.1, (wbc * 0.6).max(0.1)),
        2,
    );
    let neut = round((wbc - lymph - 0.6).max(0.3), 2);
    let creatinine = round(
        lognormal(rng, -0.05 + 0.08 * s + 0.006 * (age - 60.0), 0.25).clamp(0.3, 12.0),
        2,
    );
    let glucose = (110.0 + 8.0 * s + rng.gauss(0.0, 30.0))
        .clamp(50.0, 600.0)
        .round();
    let ferritin = lognormal(rng, 6.2 + 0.35 * s, 0.6)
        .clamp(10.0, 20_000.0)
        .round();
    let sodium = (138.0 - 0.6 * s + rng.gauss(0.0, 3.0))
        .clamp(120.0, 155.0)
        .round();
    let values = [
        age,
        sex,
        temperature,
        heart,
        resp,
        systolic,
        diastolic,
        spo2,
        device,
        crp,
        d_dimer,
        ldh,
        pct,
        troponin,
        wbc,
        lymph,
        neut,
        creatinine,
        glucose,
        ferritin,
        sodium,
    ];
    let mut emr = [None; 21];
    for ((slot, value), missing) in emr.iter_mut().zip(values).zip(site.missing) {
        *slot = (!rng.chance(missing)).then_some(value);
    }
    // Blood pressure is one reading: both or neither.
    if emr[5].is_none() || emr[6].is_none() {
        emr[5] = None;
        emr[6] = None;
    }
    let course = s + course_noise;
    let birth_year = 2020 - age as i32;
    Patient {
        case_id: format!("case-{number:05}"),
        severity: s,
        course_noise,
        emr,
        level_24h: level(course),
        level_72h: level(course + SHIFT_72H),
        name: format!(
            "FAKE^{}^{}",
            SURNAMES[rng.below(SURNAMES.len())],
            GIVEN[rng.below(GIVEN.len())]
        ),
        patient_id: format!("FAKE-{}-{number:05}", site.index + 1),
        birth_date: format!(
            "{birth_year:04}{:02}{:02}",
            1 + rng.below(12),
            1 + rng.below(28)
        ),
    }
}

/// P(level ≥ k | s, site) at a horizon: the Bayes-optimal score.
pub fn bayes_probability(site: &SiteProfile, severity: f64, shift: f64, k: usize) -> f64 {
    oxbox_metrics::normal_cdf((severity + shift - THRESHOLDS[k]) / site.label_noise)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(site: &SiteProfile, n: usize) -> Vec<Patient> {
        (0..n)
            .map(|i| sample_patient(site, i + 1, &mut Pcg::new(3, i as u64)))
            .collect()
    }

    #[test]
    fn the_general_mix_is_the_sites_own_profile_and_draws_the_same_patients() {
        for index in 0..6 {
            let plain = site_profile(index, 200);
            let mut general = plain.clone();
            CaseMix::General.apply(&mut general);
            let (a, b) = (draw(&plain, 50), draw(&general, 50));
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.severity, q.severity);
                assert_eq!(p.emr, q.emr);
                assert_eq!((p.level_24h, p.level_72h), (q.level_24h, q.level_72h));
            }
        }
    }

    #[test]
    fn mixes_change_who_comes_and_what_is_recorded_not_the_label_model() {
        let prevalence = |patients: &[Patient]| {
            patients.iter().filter(|p| p.level_24h >= 1).count() as f64 / patients.len() as f64
        };
        let mixed = |mix: CaseMix| {
            let mut site = site_profile(2, 200);
            mix.apply(&mut site);
            (site.clone(), draw(&site, 2000))
        };
        let (community, mild) = mixed(CaseMix::Community);
        let (referral, sick) = mixed(CaseMix::Referral);
        let (_, vitals) = mixed(CaseMix::VitalsOnly);
        let plain = site_profile(2, 200);
        // The label model stays: same label noise, levels from the course.
        for site in [&community, &referral] {
            assert_eq!(site.label_noise, plain.label_noise);
        }
        for p in mild.iter().chain(&sick) {
            assert_eq!(p.level_24h, level(p.severity + p.course_noise));
        }
        assert!(prevalence(&mild) + 0.3 < prevalence(&sick));
        let sd = |ps: &[Patient]| {
            let m = ps.iter().map(|p| p.severity).sum::<f64>() / ps.len() as f64;
            (ps.iter().map(|p| (p.severity - m).powi(2)).sum::<f64>() / ps.len() as f64).sqrt()
        };
        assert!((sd(&mild) - 0.6).abs() < 0.05, "{}", sd(&mild));
        // The community site rarely has the extended panel; vitals-only none.
        let present = |ps: &[Patient], i: usize| ps.iter().filter(|p| p.emr[i].is_some()).count();
        assert!(present(&mild, 10) < 300 && present(&mild, 9) > 1500);
        for i in BASIC_LABS.into_iter().chain(EXTENDED_LABS) {
            assert_eq!(present(&vitals, i), 0);
        }
        assert!(present(&vitals, 7) > 1500, "vitals are recorded");
        assert_eq!("vitals-only".parse::<CaseMix>(), Ok(CaseMix::VitalsOnly));
        assert!("tertiary".parse::<CaseMix>().is_err());
    }
}
