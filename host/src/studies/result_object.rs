//! A study's result as a DICOM object: the Comprehensive SR built from the
//! received instance and its prediction ([`crate::sr`]), kept under the data
//! dir beside the instance (`dicom/results/<source SOP Instance UID>.dcm`,
//! deleted with it at the end of `dicom.retention_hours`) and, with
//! `[dicom.forward] enabled`, sent to the hospital's PACS by C-STORE
//! ([`crate::dimse::scu`], retried per `[dicom.forward]`).

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::dicom::{DicomError, DicomFile};
use crate::dimse::scu::{self, StoreFailure, StoreOutcome};
use crate::pipeline::PredictionReport;
use crate::sr::{self, SrError, SrOptions};

/// Why a study's result object could not be made, kept or sent.
#[derive(Debug, thiserror::Error)]
pub enum ResultObjectError {
    /// The received instance could not be read back.
    #[error("reading the received instance: {0}")]
    Source(#[from] DicomError),
    /// The SR could not be built or written.
    #[error("result SR: {0}")]
    Sr(#[from] SrError),
    /// The instance is not where the listener stores instances.
    #[error("{0} is not under <data_dir>/dicom/instances")]
    Location(String),
    /// The PACS did not take the SR.
    #[error("sending the result SR to the PACS: {0}")]
    Forward(#[from] StoreFailure),
}

/// A study's result object, kept and perhaps sent.
#[derive(Debug)]
pub struct ResultObject {
    /// The SR file under the data dir.
    pub path: PathBuf,
    /// The PACS's answer, when `[dicom.forward]` is enabled.
    pub forwarded: Option<StoreOutcome>,
}

/// The results folder of a data dir.
pub fn results_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("dicom").join("results")
}

/// Where the result SR of the instance stored at `instance_path` is kept:
/// the same file name, in the results folder beside the instances folder.
pub fn result_path(instance_path: &Path) -> Option<PathBuf> {
    let name = instance_path.file_name()?;
    let dicom_dir = instance_path.parent()?.parent()?;
    Some(dicom_dir.join("results").join(name))
}

/// Builds the result SR of a study from its stored instance and `report`,
/// writes it atomically beside the instance, and sends it to the PACS when
/// `[dicom.forward] enabled` (blocking: retries wait; run it off the async
/// runtime). `image_only`: the study was inferred without its EMR record,
/// which the SR's comment says.
///
/// # Errors
/// [`ResultObjectError`], naming the stage; the SR file stays when only the
/// sending failed.
pub fn make_and_forward(
    instance_path: &Path,
    report: &PredictionReport,
    config: &Config,
    image_only: bool,
) -> Result<ResultObject, ResultObjectError> {
    let file = DicomFile::open(instance_path, &config.limits)?;
    let options = SrOptions {
        image_only,
        ..SrOptions::from_config(&config.dicom.sr)
    };
    let object = sr::build(file.object(), report, &options)?;
    drop(file);
    let path = result_path(instance_path)
        .ok_or_else(|| ResultObjectError::Location(instance_path.display().to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| {
            SrError::from(crate::output::OutputError::Io {
                path: dir.display().to_string(),
                source,
            })
        })?;
    }
    sr::write(&path, &object)?;
    let forward = &config.dicom.forward;
    let forwarded = if forward.enabled {
        Some(scu::store(
            &object,
            &forward.target(),
            &forward.retry_policy(),
        )?)
    } else {
        None
    };
    Ok(ResultObject { path, forwarded })
}
