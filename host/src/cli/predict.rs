//! `oxbox predict`: one case through the whole pipeline, as JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use oxbox::dicom::DicomFile;
use oxbox::model::{Model, select_device};
use oxbox::pipeline::Pipeline;
use oxbox::plugins::cache::ComponentCache;
use oxbox::plugins::{PluginEngine, PluginSet};
use oxbox::store::{AuditLog, new_request_id};

/// Arguments of `oxbox predict`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
oxbox predict --dicom chest.dcm --emr record.json --config /etc/oxbox/oxbox.toml\n  \
oxbox predict --config config/demo.toml --dicom samples/chest-cr-sample.dcm --emr samples/example-site-record.json\n\n\
Reads the radiograph and the EMR record (a JSON object in the site's own field names), \
runs the configured site plugins ([[plugins]]) and the model ([model] package, or \
--model), and prints the prediction: P(any O2), P(high-flow or NIV), P(ventilation or \
death) and the exam score at 24 h and 72 h, with the model digest, the plugins that \
ran and stage timings. Without --model or [model] package, the demo model embedded in \
the binary is used. Without plugins the record must be in the canonical schema, in \
canonical units or a spelling of the accepted-units table (plugins/README.md); a \
differential count in % of WBC needs the canonical plugin (samples/canonical-record.json \
is that plugin's input). With --sr, the result is also written as a DICOM \
Comprehensive SR (not for diagnostic use) referencing the radiograph. \
Every prediction, successful or not, is recorded in the audit log (`oxbox audit tail`).")]
pub struct Args {
    /// The chest radiograph (DICOM); required unless the model is EMR-only.
    #[arg(long, value_name = "X.dcm")]
    pub dicom: Option<PathBuf>,
    /// The EMR record (JSON object).
    #[arg(long, value_name = "RECORD.json")]
    pub emr: PathBuf,
    /// Model package folder; default: model.package from the config, else
    /// the embedded demo model (trained on synthetic data).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Also write the result as a DICOM Comprehensive SR (not for diagnostic
    /// use) to this file: the radiograph's patient and study, the eight
    /// outputs, the model's identity (firmware-notes/dicom-conformance.md).
    #[arg(long, value_name = "OUT.dcm", requires = "dicom")]
    pub sr: Option<PathBuf>,
}

/// Runs `oxbox predict`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    let config = super::load_config(config)?.config;
    oxbox::model::set_compute_threads(config.model.threads);
    let device = select_device(
        oxbox::config::parse_device(&config.model.device)
            .with_context(|| format!("model.device = {:?}", config.model.device))?,
    )?;
    let package = oxbox::model::demo::resolve(
        args.model.as_deref(),
        config.model.package.as_deref(),
        &config.storage.data_dir,
    )?;
    let pipeline = Pipeline::new(&config, Model::load(package, &device)?);

    let engine = Arc::new(PluginEngine::new(&config.sandbox.limits())?);
    let cache = ComponentCache::open(&config.storage.data_dir)?;
    let plugins = Arc::new(PluginSet::load(&config, &engine, Some(&cache))?);
    plugins.log_warnings();

    let text = std::fs::read_to_string(&args.emr)
        .with_context(|| format!("cannot read {}", args.emr.display()))?;
    let emr: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.emr.display()))?;
    let file = args
        .dicom
        .as_deref()
        .map(|p| DicomFile::open(p, &config.limits).with_context(|| p.display().to_string()))
        .transpose()?;
    let request_id = new_request_id();
    let audit = AuditLog::open(&config.storage.data_dir)?;
    match pipeline.predict(&request_id, file.as_ref(), &emr, &plugins) {
        Ok(report) => {
            audit.record(&report.audit_record())?;
            if let (Some(out), Some(file)) = (&args.sr, &file) {
                let options = oxbox::sr::SrOptions::from_config(&config.dicom.sr);
                let sr = oxbox::sr::build(file.object(), &report, &options).context("result SR")?;
                oxbox::sr::write(out, &sr).context("result SR")?;
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Err(e) => {
            audit.record(&pipeline.refused_record(
                &request_id,
                &plugins,
                e.is_bad_input(),
                &e.redacted(),
            ))?;
            Err(e.into())
        }
    }
}
