//! The prediction pipeline, one case end to end: radiograph → canonical
//! image → site plugins (EMR mapping, image decision) → model → the
//! prediction report. `oxbox predict` runs it once; the HTTP endpoint will
//! run it per request.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::config::{Config, LimitsConfig};
use crate::dicom::{self, DicomFile, ImageHeader};
use crate::model::{Model, ModelError, ModelInput, Prediction};
use crate::plugins::record::{RecordError, image_frame, raw_fields_from_json};
use crate::plugins::{ImageDecision, PluginError, PluginSet};

/// Why a case could not be predicted.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The radiograph was refused.
    #[error("radiograph: {0}")]
    Dicom(#[from] dicom::DicomError),
    /// The EMR record is malformed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A plugin rejected the case or failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The model could not run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Without plugins, the record must already be canonical.
    #[error("EMR field {field:?}: {reason} (no site plugin maps this record)")]
    NotCanonical {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl PipelineError {
    /// Whether the input was at fault (CLI exit 2; HTTP 4xx later) rather
    /// than the box.
    pub fn is_bad_input(&self) -> bool {
        match self {
            PipelineError::Dicom(_)
            | PipelineError::Record(_)
            | PipelineError::NotCanonical { .. } => true,
            PipelineError::Plugin(e) => e.is_bad_input(),
            PipelineError::Model(e) => matches!(e, ModelError::Input(_)),
        }
    }

    /// The error as it may be written where it outlives the request —
    /// evaluation reports, training summaries, logs: its category and the
    /// field, attribute or plugin it concerns, never a value from the input.
    ///
    /// A plugin's rejection message is the plugin's own text and may quote
    /// the value it refused, a schema error quotes the number it checked,
    /// and a file path may hold a patient's name: all three are left out.
    pub fn redacted(&self) -> String {
        match self {
            PipelineError::Dicom(dicom::DicomError::Io { source, .. }) => {
                format!("radiograph: cannot read the file: {}", source.kind())
            }
            // The ingest's errors name attributes by keyword and tag; the
            // only values they quote are coded ones (photometric
            // interpretation, transfer syntax) and sizes.
            PipelineError::Dicom(e) => format!("radiograph: {e}"),
            // Field names, sizes and fixed reasons only.
            PipelineError::Record(e) => e.to_string(),
            PipelineError::NotCanonical { field, .. } => {
                format!("EMR field {field:?}: not a canonical value (name, number, unit or range)")
            }
            PipelineError::Plugin(PluginError::Rejected { plugin, field, .. }) => match field {
                Some(field) => format!("plugin {plugin} rejected the input (field {field})"),
                None => format!("plugin {plugin} rejected the input (no field named)"),
            },
            PipelineError::Plugin(PluginError::Implausible {
                plugin,
                feature,
                reason,
            }) => format!("plugin {plugin} gave an implausible {feature} ({reason})"),
            // Faults and load errors are the host's own words.
            PipelineError::Plugin(e) => e.to_string(),
            PipelineError::Model(e) => e.to_string(),
        }
    }
}

/// The model's identity in a report.
#[derive(Debug, Clone, Serialize)]
pub struct ModelIdentity {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Package digest.
    pub digest: String,
    /// Whether the weights were trained.
    pub trained: bool,
}

/// A plugin's identity in a report.
#[derive(Debug, Clone, Serialize)]
pub struct PluginIdentity {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// Stage timings, milliseconds (durations only: no patient data).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Parsing the DICOM data set (the server's scan and parse of the
    /// received bytes; 0 when the caller parsed the file itself).
    pub parse: f64,
    /// Reading the image header and decoding the first frame's pixels.
    pub decode: f64,
    /// Canonical preprocessing (modality LUT, VOI, resize to S×S).
    pub preprocess: f64,
    /// Site plugins (EMR mapping, image decision and its pixel hand-over).
    pub plugins: f64,
    /// Waiting for the model (the server's batching queue; 0 in process).
    pub queue: f64,
    /// The model's forward pass (shared by a batch).
    pub inference: f64,
    /// Everything from the parse to the prediction.
    pub total: f64,
}

impl Timings {
    /// The pipeline's stages with their durations in milliseconds, in the
    /// order the data passes them (without `total`).
    pub fn stages(&self) -> [(&'static str, f64); 6] {
        [
            ("parse", self.parse),
            ("decode", self.decode),
            ("preprocess", self.preprocess),
            ("plugins", self.plugins),
            ("queue", self.queue),
            ("inference", self.inference),
        ]
    }
}

/// What a prediction returns (no patient identifiers, ever).
#[derive(Debug, Clone, Serialize)]
pub struct PredictionReport {
    /// The request's id (also in the audit log).
    pub request_id: String,
    /// The model.
    pub model: ModelIdentity,
    /// The plugins that ran, in order.
    pub plugins: Vec<PluginIdentity>,
    /// The site id.
    pub site: String,
    /// Probabilities and exam score per horizon.
    pub horizons: Prediction,
    /// Things the operator should know (e.g. a replaced image).
    pub warnings: Vec<String>,
    /// Stage timings.
    pub timings_ms: Timings,
}

/// A loaded model with the site's plugins.
pub struct Pipeline {
    model: Model,
    site: String,
    limits: LimitsConfig,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

impl Pipeline {
    /// A pipeline for `config`'s site around a loaded model.
    pub fn new(config: &Config, model: Model) -> Self {
        Self {
            model,
            site: config.site.id.clone(),
            limits: config.limits.clone(),
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Predicts one case: an optional radiograph (required by image models)
    /// and the site's EMR record (a JSON object), through `plugins`.
    ///
    /// # Errors
    /// [`PipelineError`], naming the stage and the cause.
    pub fn predict(
        &self,
        request_id: &str,
        dicom_file: Option<&DicomFile>,
        emr: &serde_json::Value,
        plugins: &Arc<PluginSet>,
    ) -> Result<PredictionReport, PipelineError> {
        let case = self.prepare(dicom_file, emr, plugins)?;
        let t = Instant::now();
        let horizons = self
            .model
            .predict(case.input.image.as_deref(), &case.input.features)?;
        let inference = ms(t);
        Ok(self.report(request_id, case, horizons, 0.0, inference))
    }

    /// Everything before the model: radiograph → canonical image, site
    /// plugins (EMR mapping, image decision), checked against the model.
    /// The server batches the model step of several prepared cases.
    ///
    /// # Errors
    /// [`PipelineError`], naming the stage and the cause.
    pub fn prepare(
        &self,
        dicom_file: Option<&DicomFile>,
        emr: &serde_json::Value,
        plugins: &Arc<PluginSet>,
    ) -> Result<PreparedCase, PipelineError> {
        let started = Instant::now();
        let mut warnings = Vec::new();
        let mut timings = Timings::default();
        let size = self.model.package().manifest.input_size;

        // Radiograph → canonical image (and what image plugins need).
        let decoded = match (self.model.uses_image(), dicom_file) {
            (true, Some(file)) => {
                let t = Instant::now();
                let header = ImageHeader::read(file)?;
                let geometry = header.accept(&self.limits)?;
                let frame = dicom::pixels::decode_first_frame(file, &geometry)?;
                timings.decode = ms(t);
                let t = Instant::now();
                let canonical = dicom::canonical::preprocess(&header, &geometry, &frame, size);
                timings.preprocess = ms(t);
                // The decoded frame moves into the plugins' `pixels` (rows
                // converted lazily), or is dropped here; counted as the
                // plugins' time.
                let t = Instant::now();
                let plugin_input = plugins
                    .preprocesses_images()
                    .then(|| image_frame(&header, frame, &canonical));
                timings.plugins = ms(t);
                Some((canonical, plugin_input))
            }
            (true, None) => {
                return Err(ModelError::Input("this model needs a radiograph".to_owned()).into());
            }
            (false, Some(_)) => {
                warnings.push("the model is EMR-only: the radiograph was not used".to_owned());
                None
            }
            (false, None) => None,
        };

        // Site plugins: EMR mapping, image decision.
        let t = Instant::now();
        let fields = raw_fields_from_json(emr)?;
        let features: Vec<(String, Option<f64>)> = if plugins.maps_emr() {
            plugins
                .map_emr(fields)?
                .into_iter()
                .map(|f| (f.name, f.value))
                .collect()
        } else {
            canonical_features(&fields)?
        };
        let image = match decoded {
            Some((canonical, Some((frame, pixels)))) => {
                match plugins.preprocess_image(&frame, &pixels)? {
                    ImageDecision::KeepCanonical => Some(canonical.data),
                    ImageDecision::Replace(image) => {
                        warnings.push("a site plugin replaced the canonical image".to_owned());
                        Some(image)
                    }
                }
            }
            Some((canonical, None)) => Some(canonical.data),
            None => None,
        };
        // Two rounded parts: round the sum too (0.1 + 0.2 is not 0.3).
        timings.plugins = ((timings.plugins + ms(t)) * 1e3).round() / 1e3;
        let input = ModelInput { image, features };
        self.model.check_input(&input)?;
        Ok(PreparedCase {
            input,
            plugins: plugins
                .plugins()
                .iter()
                .map(|p| PluginIdentity {
                    name: p.name().to_owned(),
                    version: p.version().to_owned(),
                })
                .collect(),
            warnings,
            timings,
            started,
        })
    }

    /// The report for a prepared case and its prediction; `queue_ms` and
    /// `inference_ms` are the model step's times as this case saw them
    /// (waiting for the model, and the forward pass).
    pub fn report(
        &self,
        request_id: &str,
        case: PreparedCase,
        horizons: Prediction,
        queue_ms: f64,
        inference_ms: f64,
    ) -> PredictionReport {
        let mut timings = case.timings;
        timings.queue = queue_ms;
        timings.inference = inference_ms;
        timings.total = ms(case.started);
        PredictionReport {
            request_id: request_id.to_owned(),
            model: self.model_identity(),
            plugins: case.plugins,
            site: self.site.clone(),
            horizons,
            warnings: case.warnings,
            timings_ms: timings,
        }
    }

    /// The audit record of a prediction that was not given: the category
    /// (`rejected` for bad input, else `failed`) and `reason`, the error as
    /// [`PipelineError::redacted`] gives it (the plugin and field, never a
    /// value) — never the error's own text, which may echo the input.
    pub fn refused_record(
        &self,
        request_id: &str,
        plugins: &PluginSet,
        bad_input: bool,
        reason: &str,
    ) -> crate::store::AuditRecord {
        crate::store::AuditRecord {
            time: String::new(),
            request_id: request_id.to_owned(),
            model_digest: self.model.package().digest.clone(),
            plugins: plugins
                .plugins()
                .iter()
                .map(|p| format!("{} {}", p.name(), p.version()))
                .collect(),
            outputs: serde_json::Value::Null,
            timings_ms: serde_json::Value::Null,
            status: if bad_input { "rejected" } else { "failed" }.to_owned(),
            reason: Some(reason.to_owned()),
        }
    }

    /// The model's identity, as reports and `GET /v1/model` give it.
    pub fn model_identity(&self) -> ModelIdentity {
        let manifest = &self.model.package().manifest;
        ModelIdentity {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: self.model.package().digest.clone(),
            trained: manifest.trained,
        }
    }
}

/// A case ready for the model: its input, and what the report needs.
#[derive(Debug)]
pub struct PreparedCase {
    /// What the model takes.
    pub input: ModelInput,
    plugins: Vec<PluginIdentity>,
    warnings: Vec<String>,
    timings: Timings,
    started: Instant,
}

impl PreparedCase {
    /// Counts the parse of the DICOM data set, done before
    /// [`Pipeline::prepare`], in the case's timings (and its total).
    pub fn add_parse_time(&mut self, parse: std::time::Duration) {
        self.timings.parse = (parse.as_secs_f64() * 1e6).round() / 1e3;
        if let Some(started) = self.started.checked_sub(parse) {
            self.started = started;
        }
    }
}

impl PredictionReport {
    /// The audit record of this prediction.
    pub fn audit_record(&self) -> crate::store::AuditRecord {
        // Through text, so the log holds the same decimals the caller got
        // (f32 printed shortest, not widened to f64).
        fn as_json<T: Serialize>(value: &T) -> serde_json::Value {
            serde_json::to_string(value)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default()
        }
        crate::store::AuditRecord {
            time: String::new(),
            request_id: self.request_id.clone(),
            model_digest: self.model.digest.clone(),
            plugins: self
                .plugins
                .iter()
                .map(|p| format!("{} {}", p.name, p.version))
                .collect(),
            outputs: as_json(&self.horizons),
            timings_ms: as_json(&self.timings_ms),
            status: "ok".to_owned(),
            reason: None,
        }
    }
}

/// A record already in the canonical schema (no plugin configured):
/// canonical names, numeric values, range-checked.
fn canonical_features(
    fields: &[crate::plugins::RawField],
) -> Result<Vec<(String, Option<f64>)>, PipelineError> {
    fields
        .iter()
        .map(|f| {
            let bad = |reason: String| PipelineError::NotCanonical {
                field: f.name.clone(),
                reason,
            };
            let spec = oxbox_emr_schema::feature(&f.name)
                .ok_or_else(|| bad("not a canonical feature".to_owned()))?;
            if oxbox_emr_schema::is_missing(&f.value) {
                return Ok((f.name.clone(), None));
            }
            let value = oxbox_emr_schema::parse_number(&f.value).map_err(|e| bad(e.to_string()))?;
            let value = oxbox_emr_schema::to_canonical(spec, value, f.unit.as_deref())
                .map_err(|e| bad(e.to_string()))?;
            let value = oxbox_emr_schema::check(spec, value).map_err(|e| bad(e.to_string()))?;
            Ok((f.name.clone(), Some(value)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_errors_keep_the_field_and_drop_the_value() {
        let rejected = PipelineError::Plugin(PluginError::Rejected {
            plugin: "example-site 0.1.0".to_owned(),
            field: Some("TEMP_F".to_owned()),
            message: "\"DOE^JANE\" is not a number".to_owned(),
        });
        assert!(rejected.to_string().contains("DOE^JANE"));
        let redacted = rejected.redacted();
        assert_eq!(
            redacted,
            "plugin example-site 0.1.0 rejected the input (field TEMP_F)"
        );

        let schema = PipelineError::NotCanonical {
            field: "spo2_pct".to_owned(),
            reason: "917 is outside 50–100".to_owned(),
        };
        assert!(!schema.redacted().contains("917"), "{}", schema.redacted());
        assert!(schema.redacted().contains("spo2_pct"));

        let implausible = PipelineError::Plugin(PluginError::Implausible {
            plugin: "my-site 0.2.0".to_owned(),
            feature: "spo2_pct".to_owned(),
            reason: "outside the plausible range 30..=100 % of EMR schema v1".to_owned(),
        });
        assert!(implausible.is_bad_input());
        assert_eq!(
            implausible.redacted(),
            "plugin my-site 0.2.0 gave an implausible spo2_pct (outside the plausible range 30..=100 % of EMR schema v1)"
        );

        let io = PipelineError::Dicom(dicom::DicomError::Io {
            path: "/pacs/DOE^JANE/chest.dcm".to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(!io.redacted().contains("DOE"), "{}", io.redacted());
    }
}
