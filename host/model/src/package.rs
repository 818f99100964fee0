//! Model packages: a folder with `model.toml` (what the model is, its EMR
//! schema with units, plausible ranges and normalisation statistics, its
//! architecture) and `weights.safetensors`. Its digest — sha256 over a
//! canonical listing of both files' sha256 — identifies exactly which model
//! produced a prediction (audit records carry it).
//!
//! A package travels as bytes too ([`PackageBytes`]: read, written, sent);
//! its digest is always computed over the bytes that are parsed and loaded
//! ([`PackageBytes::package`], `Model::from_bytes`), and `Model::load`
//! refuses weights that changed since the package was read.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ModelError;

/// File names inside a package.
pub const MANIFEST_FILE: &str = "model.toml";
/// The weights file inside a package.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// Largest `model.toml` accepted.
const MAX_MANIFEST_BYTES: u64 = 256 * 1024;

/// Image backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backbone {
    /// A small ResNet (widths 8–64, one block per stage): tests and the
    /// embedded demo model.
    Tiny,
    /// ResNet-18.
    Resnet18,
    /// ResNet-34.
    Resnet34,
}

/// `[architecture]` of `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// `backbone = "resnet18"`.
    pub backbone: Backbone,
    /// `emr_only = false`: no image branch.
    #[serde(default)]
    pub emr_only: bool,
    /// `cross_layers = 2`: cross layers of the EMR Deep & Cross network.
    pub cross_layers: usize,
    /// `deep_layers = [64, 64]`: widths of its MLP.
    pub deep_layers: Vec<usize>,
    /// `fusion_layers = [128]`: widths of the fusion MLP.
    pub fusion_layers: Vec<usize>,
}

/// One `[[emr]]` feature of `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmrFeature {
    /// Canonical name (schema v1).
    pub name: String,
    /// Canonical unit.
    pub unit: String,
    /// Smallest plausible value.
    pub min: f64,
    /// Largest plausible value.
    pub max: f64,
    /// Normalisation: mean.
    pub mean: f64,
    /// Normalisation: standard deviation (> 0), of ln(value) when `log`.
    pub std: f64,
    /// Whether the value is log-transformed, ln(1 + value), before
    /// normalisation (`log = true` for right-skewed labs; absent = false).
    /// `mean` and `std` are then those of ln(1 + value).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log: bool,
}

impl EmrFeature {
    /// The model's input for a present value: clamped to the plausible
    /// range, ln(1 + value) when `log`, then standardised.
    pub fn normalise(&self, value: f64) -> f32 {
        let v = value.clamp(self.min, self.max);
        let v = if self.log { v.ln_1p() } else { v };
        ((v - self.mean) / self.std) as f32
    }
}

/// Encodes canonical features (by name; absent, `None` or non-finite =
/// missing) as normalised values and missing indicators in `emr`'s order:
/// what the model's EMR branch takes.
pub fn encode_emr(emr: &[EmrFeature], features: &[(String, Option<f64>)]) -> (Vec<f32>, Vec<f32>) {
    let mut values = vec![0f32; emr.len()];
    let mut missing = vec![1f32; emr.len()];
    for (i, spec) in emr.iter().enumerate() {
        let value = features
            .iter()
            .find(|(name, _)| *name == spec.name)
            .and_then(|(_, v)| *v)
            .filter(|v| v.is_finite());
        if let Some(v) = value {
            values[i] = spec.normalise(v);
            missing[i] = 0.0;
        }
    }
    (values, missing)
}

/// The contents of `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Whether the weights were trained (false: a deterministic random
    /// initialisation, for demos and tests).
    pub trained: bool,
    /// Side S of the (1, S, S) image input.
    pub input_size: u32,
    /// The network.
    pub architecture: Architecture,
    /// `[federation]`: where a federated model came from (written by the
    /// aggregator; absent for a locally trained or initialised model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<ModelProvenance>,
    /// The EMR features, in input order.
    pub emr: Vec<EmrFeature>,
}

/// `[federation]` of `model.toml`: the federation round that produced a
/// global model (`GET /v1/model` shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProvenance {
    /// `job = "exam-sim"`: the federation job.
    pub job: String,
    /// `round = 3`: the round whose aggregation produced the weights (0:
    /// the starting model with the federated normalisation).
    pub round: u64,
    /// `aggregator = "<hex>"`: the aggregator's Ed25519 public key, which
    /// signed the round's global-model record.
    pub aggregator: String,
}

/// A loaded, checked model package.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    /// The manifest.
    pub manifest: ModelManifest,
    /// The package folder.
    pub dir: PathBuf,
    /// sha256 over the canonical listing of the package's files, hex.
    pub digest: String,
    /// sha256 of the weights file's bytes, hex (what `Model::load`
    /// checks the bytes it loads against).
    pub weights_sha256: String,
}

/// A package's two files, as bytes: what is read, written, sent and loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct PackageBytes {
    /// `model.toml`.
    pub manifest: Vec<u8>,
    /// `weights.safetensors`.
    pub weights: Vec<u8>,
}

impl std::fmt::Debug for PackageBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageBytes")
            .field("manifest", &format_args!("{} bytes", self.manifest.len()))
            .field("weights", &format_args!("{} bytes", self.weights.len()))
            .finish()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl PackageBytes {
    /// Reads both files of the package in `dir` (`model.toml` at most
    /// 256 KiB).
    ///
    /// # Errors
    /// [`ModelError::Io`], or [`ModelError::Invalid`] for an oversized
    /// manifest.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| ModelError::Io { path, source }
        };
        let file = std::fs::File::open(&manifest_path).map_err(io(&manifest_path))?;
        let mut manifest = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut manifest)
            .map_err(io(&manifest_path))?;
        if manifest.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ModelError::Invalid {
                path: manifest_path.display().to_string(),
                reason: format!("over {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let weights = std::fs::read(&weights_path).map_err(io(&weights_path))?;
        Ok(Self { manifest, weights })
    }

    /// Writes both files into `dir` (created if needed), each atomically.
    ///
    /// # Errors
    /// [`ModelError::Io`].
    pub fn write(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        for (name, bytes) in [
            (WEIGHTS_FILE, &self.weights),
            (MANIFEST_FILE, &self.manifest),
        ] {
            let path = dir.join(name);
            oxbox_files::write_bytes(&path, bytes).map_err(|e| ModelError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }

    /// The package digest of these bytes.
    pub fn digest(&self) -> String {
        package_digest(&sha256_hex(&self.manifest), &sha256_hex(&self.weights))
    }

    /// Parses and checks the manifest; the package these bytes are, its
    /// digest over these very bytes; `dir` is where it lives (or will).
    ///
    /// # Errors
    /// [`ModelError::Invalid`] naming `dir/model.toml`.
    pub fn package(&self, dir: &Path) -> Result<ModelPackage, ModelError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let invalid = |reason: String| ModelError::Invalid {
            path: manifest_path.display().to_string(),
            reason,
        };
        if self.manifest.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("over {MAX_MANIFEST_BYTES} bytes")));
        }
        let text =
            std::str::from_utf8(&self.manifest).map_err(|_| invalid("not UTF-8".to_owned()))?;
        let manifest: ModelManifest =
            toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
        manifest.validate().map_err(invalid)?;
        let weights_sha256 = sha256_hex(&self.weights);
        Ok(ModelPackage {
            manifest,
            dir: dir.to_path_buf(),
            digest: package_digest(&sha256_hex(&self.manifest), &weights_sha256),
            weights_sha256,
        })
    }
}

/// The package digest from its files' digests.
pub fn package_digest(manifest_sha256: &str, weights_sha256: &str) -> String {
    let listing = format!(
        "oxbox-model-package-v1\n{MANIFEST_FILE} {manifest_sha256}\n{WEIGHTS_FILE} {weights_sha256}\n"
    );
    hex::encode(ring::digest::digest(&ring::digest::SHA256, listing.as_bytes()).as_ref())
}

impl ModelPackage {
    /// Loads and checks the package in `dir`.
    ///
    /// # Errors
    /// [`ModelError::Io`] or [`ModelError::Invalid`] (syntax, unknown keys,
    /// a feature outside schema v1, a non-positive std, …).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        PackageBytes::read(dir)?.package(dir)
    }

    /// The weights file.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
}

impl ModelManifest {
    /// Checks every field; the first problem, naming the key.
    ///
    /// # Errors
    /// A message naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(16..=4096).contains(&self.input_size) {
            return Err(format!(
                "input_size = {}: must be 16..=4096",
                self.input_size
            ));
        }
        if self.emr.is_empty() {
            return Err("emr: at least one feature".to_owned());
        }
        for (i, f) in self.emr.iter().enumerate() {
            if oxbox_emr_schema::feature(&f.name).is_none() {
                return Err(format!(
                    "emr[{i}].name = {:?}: not a feature of EMR schema v1",
                    f.name
                ));
            }
            if !(f.std.is_finite() && f.std > 0.0 && f.mean.is_finite()) {
                return Err(format!(
                    "emr[{i}] ({}): mean must be finite and std > 0",
                    f.name
                ));
            }
            if f.log && f.min < 0.0 {
                return Err(format!("emr[{i}] ({}): log = true needs min >= 0", f.name));
            }
            if f.min.partial_cmp(&f.max) != Some(std::cmp::Ordering::Less) {
                return Err(format!("emr[{i}] ({}): min must be below max", f.name));
            }
            if self.emr[..i].iter().any(|g| g.name == f.name) {
                return Err(format!("emr[{i}].name = {:?}: given twice", f.name));
            }
        }
        let a = &self.architecture;
        if a.cross_layers > 16 || a.deep_layers.len() > 16 || a.fusion_layers.len() > 16 {
            return Err("architecture: at most 16 layers per part".to_owned());
        }
        if a.deep_layers
            .iter()
            .chain(&a.fusion_layers)
            .any(|&w| w == 0 || w > 8192)
        {
            return Err("architecture: layer widths must be 1..=8192".to_owned());
        }
        Ok(())
    }
}

/// Typical emergency-department values (mean, standard deviation) per
/// schema v1 feature: the normalisation of an untrained package, until
/// training replaces them with a cohort's statistics.
pub fn default_statistics(name: &str) -> (f64, f64) {
    match name {
        "age_years" => (55.0, 18.0),
        "sex" => (0.5, 0.5),
        "temperature_c" => (37.3, 0.9),
        "heart_rate_bpm" => (92.0, 18.0),
        "resp_rate_bpm" => (21.0, 5.0),
        "systolic_bp_mmhg" => (130.0, 20.0),
        "diastolic_bp_mmhg" => (78.0, 12.0),
        "spo2_pct" => (94.0, 4.0),
        "o2_device_at_triage" => (0.4, 0.7),
        "crp_mg_l" => (60.0, 60.0),
        "d_dimer_ng_ml_feu" => (1200.0, 1500.0),
        "ldh_u_l" => (320.0, 150.0),
        "procalcitonin_ng_ml" => (0.4, 1.0),
        "troponin_t_ng_l" => (18.0, 30.0),
        "wbc_e9_l" => (8.0, 4.0),
        "lymphocytes_e9_l" => (1.1, 0.7),
        "neutrophils_e9_l" => (6.2, 3.5),
        "creatinine_mg_dl" => (1.1, 0.7),
        "glucose_mg_dl" => (125.0, 45.0),
        "ferritin_ng_ml" => (600.0, 700.0),
        "sodium_mmol_l" => (137.0, 4.0),
        _ => (0.0, 1.0),
    }
}
