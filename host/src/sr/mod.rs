//! Result objects: a prediction as a DICOM Comprehensive SR instance, in the
//! spirit of IHE AI Results (AIR), that goes back to the hospital's PACS.
//!
//! [`build`] makes the SR from the source radiograph's data set, the
//! [`PredictionReport`] and [`SrOptions`]; [`write`] stores it as a Part 10
//! file, atomically. The instance:
//! - copies the source's Patient and General Study modules, and nothing else
//!   of it (no private attribute, no equipment, no pixel);
//! - is a new series (Modality SR, Series Description ending in
//!   "NOT FOR DIAGNOSTIC USE") with new Series and SOP Instance UIDs derived
//!   from the source's SOP Instance UID and the model's digest ([`derive_uid`]),
//!   so that a re-sent result replaces itself instead of piling up;
//! - references the source image in the Current Requested Procedure Evidence
//!   Sequence and in the content tree (an IMAGE item per measurement);
//! - carries the six probabilities and two exam scores as NUM items coded in
//!   the private scheme `99OXBOX` ([`codes`]), declared in the Coding Scheme
//!   Identification Sequence;
//! - names the model (name, version, digest) in the Contributing Equipment
//!   Sequence (Processing Equipment) and in algorithm identification items;
//! - is COMPLETE and UNVERIFIED: nobody has checked it.
//!
//! The content tree (TID 1500-like; see `firmware-notes/dicom-conformance.md`):
//!
//! ```text
//! CONTAINER Imaging Measurement Report (DCM 126000)
//!  ├ HAS CONCEPT MOD CODE Language of Content = English
//!  ├ HAS OBS CONTEXT CODE Observer Type = Device
//!  ├ HAS OBS CONTEXT UIDREF/TEXT Device Observer UID, Name, Manufacturer, Model Name
//!  ├ CONTAINS TEXT Comment = "Research use only ... not for diagnostic use"
//!  └ CONTAINS CONTAINER Imaging Measurements (DCM 126010)
//!     └ CONTAINS CONTAINER Measurement Group (DCM 125007)
//!        ├ HAS OBS CONTEXT TEXT/UIDREF Tracking Identifier, Tracking Unique Identifier
//!        ├ CONTAINS TEXT Algorithm Name, Algorithm Version, Model package digest
//!        └ CONTAINS NUM ×8 (99OXBOX codes, UCUM "1")
//!           └ INFERRED FROM IMAGE Source of Measurement → the radiograph
//! ```
//!
//! Errors name the missing or invalid source attribute by keyword and tag,
//! never its value.

pub mod codes;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileDicomObject, InMemDicomObject};
use serde::{Deserialize, Serialize};

use crate::model::{HorizonPrediction, Prediction};
use crate::output::{self, OutputError};
use crate::pipeline::{ModelIdentity, PredictionReport};
use codes::Code;

/// Manufacturer written in General Equipment and Contributing Equipment.
pub const MANUFACTURER: &str = "oxbox";

/// The Series Description of every result SR.
pub const SERIES_DESCRIPTION: &str = "oxbox AI result - NOT FOR DIAGNOSTIC USE";

/// The comment item's text.
pub const DISCLAIMER: &str = "Generated automatically by oxbox from a chest radiograph and the \
EMR; not reviewed by a physician. Research use only: NOT FOR DIAGNOSTIC USE.";

/// The comment item's text for an image-only inference
/// ([`SrOptions::image_only`]).
pub const DISCLAIMER_IMAGE_ONLY: &str = "Generated automatically by oxbox from a chest \
radiograph alone, without an EMR record (none came in time: every EMR feature missing); not \
reviewed by a physician. Research use only: NOT FOR DIAGNOSTIC USE.";

/// The SR settings an operator may change (`[dicom.sr]`, the `sr` field of
/// [`crate::config::DicomConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SrConfig {
    /// UID root under which the SR's UIDs are made (the hospital's or the
    /// vendor's registered root). Unset: UUID-derived UIDs under `2.25`.
    pub uid_root: Option<String>,
    /// Series Number of the result series.
    pub series_number: u32,
}

impl Default for SrConfig {
    fn default() -> Self {
        Self {
            uid_root: None,
            series_number: 7001,
        }
    }
}

impl SrConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`SrError::InvalidOption`] naming the key.
    pub fn validate(&self) -> Result<(), SrError> {
        if let Some(root) = &self.uid_root {
            check_uid_root(root)?;
        }
        if self.series_number > i32::MAX as u32 {
            return Err(SrError::InvalidOption {
                option: "dicom.sr.series_number",
                reason: "over 2147483647 (IS)".into(),
            });
        }
        Ok(())
    }
}

/// How one SR is made.
#[derive(Debug, Clone)]
pub struct SrOptions {
    /// UID root (see [`SrConfig::uid_root`]).
    pub uid_root: Option<String>,
    /// Series Number.
    pub series_number: u32,
    /// Content and instance creation time (written in UTC).
    pub created: SystemTime,
    /// Inferred without an EMR record (`dicom.image_only`): the comment
    /// item says so ([`DISCLAIMER_IMAGE_ONLY`]).
    pub image_only: bool,
}

impl Default for SrOptions {
    fn default() -> Self {
        Self::from_config(&SrConfig::default())
    }
}

impl SrOptions {
    /// Options from the configuration, created now.
    pub fn from_config(config: &SrConfig) -> Self {
        Self {
            uid_root: config.uid_root.clone(),
            series_number: config.series_number,
            created: SystemTime::now(),
            image_only: false,
        }
    }
}

/// Why a result SR could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum SrError {
    /// The source data set lacks an attribute the SR needs.
    #[error("source image: missing attribute {keyword} {tag}")]
    MissingAttribute {
        /// DICOM keyword.
        keyword: &'static str,
        /// The tag, as `(gggg,eeee)`.
        tag: &'static str,
    },
    /// A source attribute the SR needs is unusable (its value is not quoted:
    /// it may identify the patient or study).
    #[error("source image: attribute {keyword} {tag} {reason}")]
    InvalidAttribute {
        /// DICOM keyword.
        keyword: &'static str,
        /// The tag.
        tag: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A predicted value is not a number in [0, 1].
    #[error("prediction: {item} is {value}, not a number in [0, 1]")]
    InvalidPrediction {
        /// Which output.
        item: &'static str,
        /// The value.
        value: f32,
    },
    /// The model identity cannot be written (empty or over the VR's length).
    #[error("model identity: {field} {reason}")]
    InvalidModel {
        /// `name`, `version` or `digest`.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// An option is invalid.
    #[error("{option}: {reason}")]
    InvalidOption {
        /// The configuration key.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// dicom-rs could not encode the object.
    #[error("cannot encode the SR: {0}")]
    Encode(String),
    /// The file could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// The source image's identity, as the SR references it.
#[derive(Debug, Clone)]
struct SourceImage {
    study_uid: String,
    series_uid: String,
    sop_class_uid: String,
    sop_instance_uid: String,
}

/// The Patient module (PS3.3 C.7.1.1): tag, and the VR of a type 2
/// attribute (written empty when the source lacks it).
const PATIENT_MODULE: &[(Tag, Option<VR>)] = &[
    (tags::PATIENT_NAME, Some(VR::PN)),
    (tags::PATIENT_ID, Some(VR::LO)),
    (tags::ISSUER_OF_PATIENT_ID, None),
    (tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE, None),
    (tags::TYPE_OF_PATIENT_ID, None),
    (tags::PATIENT_BIRTH_DATE, Some(VR::DA)),
    (tags::PATIENT_BIRTH_TIME, None),
    (tags::PATIENT_BIRTH_DATE_IN_ALTERNATIVE_CALENDAR, None),
    (tags::PATIENT_DEATH_DATE_IN_ALTERNATIVE_CALENDAR, None),
    (tags::PATIENT_ALTERNATIVE_CALENDAR, None),
    (tags::PATIENT_SEX, Some(VR::CS)),
    (tags::QUALITY_CONTROL_SUBJECT, None),
    (tags::REFERENCED_PATIENT_SEQUENCE, None),
    (tags::REFERENCED_PATIENT_PHOTO_SEQUENCE, None),
    (tags::OTHER_PATIENT_I_DS_SEQUENCE, None),
    (tags::OTHER_PATIENT_NAMES, None),
    (tags::PATIENT_COMMENTS, None),
    (tags::PATIENT_SPECIES_DESCRIPTION, None),
    (tags::PATIENT_SPECIES_CODE_SEQUENCE, None),
    (tags::PATIENT_BREED_DESCRIPTION, None),
    (tags::PATIENT_BREED_CODE_SEQUENCE, None),
    (tags::BREED_REGISTRATION_SEQUENCE, None),
    (tags::STRAIN_DESCRIPTION, None),
    (tags::STRAIN_NOMENCLATURE, None),
    (tags::STRAIN_STOCK_SEQUENCE, None),
    (tags::STRAIN_ADDITIONAL_INFORMATION, None),
    (tags::STRAIN_CODE_SEQUENCE, None),
    (tags::GENETIC_MODIFICATIONS_SEQUENCE, None),
    (tags::RESPONSIBLE_PERSON, None),
    (tags::RESPONSIBLE_PERSON_ROLE, None),
    (tags::RESPONSIBLE_ORGANIZATION, None),
    (tags::PATIENT_IDENTITY_REMOVED, None),
    (tags::DEIDENTIFICATION_METHOD, None),
    (tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE, None),
    (tags::SOURCE_PATIENT_GROUP_IDENTIFICATION_SEQUENCE, None),
    (tags::GROUP_OF_PATIENTS_IDENTIFICATION_SEQUENCE, None),
];

/// The General Study module (PS3.3 C.7.2.1) but Study Instance UID (type 1,
/// checked separately): tag, and the VR of a type 2 attribute.
const GENERAL_STUDY_MODULE: &[(Tag, Option<VR>)] = &[
    (tags::STUDY_DATE, Some(VR::DA)),
    (tags::STUDY_TIME, Some(VR::TM)),
    (tags::REFERRING_PHYSICIAN_NAME, Some(VR::PN)),
    (tags::REFERRING_PHYSICIAN_IDENTIFICATION_SEQUENCE, None),
    (tags::CONSULTING_PHYSICIAN_NAME, None),
    (tags::CONSULTING_PHYSICIAN_IDENTIFICATION_SEQUENCE, None),
    (tags::STUDY_ID, Some(VR::SH)),
    (tags::ACCESSION_NUMBER, Some(VR::SH)),
    (tags::ISSUER_OF_ACCESSION_NUMBER_SEQUENCE, None),
    (tags::STUDY_DESCRIPTION, None),
    (tags::PHYSICIANS_OF_RECORD, None),
    (tags::PHYSICIANS_OF_RECORD_IDENTIFICATION_SEQUENCE, None),
    (tags::NAME_OF_PHYSICIANS_READING_STUDY, None),
    (tags::PHYSICIANS_READING_STUDY_IDENTIFICATION_SEQUENCE, None),
    (tags::REQUESTING_SERVICE_CODE_SEQUENCE, None),
    (tags::REFERENCED_STUDY_SEQUENCE, None),
    (tags::PROCEDURE_CODE_SEQUENCE, None),
    (tags::REASON_FOR_PERFORMED_PROCEDURE_CODE_SEQUENCE, None),
];

/// Builds the result SR of `report` for the radiograph `source` (its data
/// set, as read by [`crate::dicom::DicomFile`]).
///
/// # Errors
/// [`SrError`]: a missing or invalid source attribute (named, never quoted),
/// a prediction outside [0, 1], an unusable model identity or UID root.
pub fn build(
    source: &InMemDicomObject,
    report: &PredictionReport,
    options: &SrOptions,
) -> Result<FileDicomObject<InMemDicomObject>, SrError> {
    build_from(source, &report.model, &report.horizons, options)
}

/// [`build`] from the model identity and prediction alone.
///
/// # Errors
/// As [`build`].
pub fn build_from(
    source: &InMemDicomObject,
    model: &ModelIdentity,
    prediction: &Prediction,
    options: &SrOptions,
) -> Result<FileDicomObject<InMemDicomObject>, SrError> {
    let image = source_image(source)?;
    check_model(model)?;
    let measurements = measurements(prediction)?;
    let root = options.uid_root.as_deref();
    if let Some(root) = root {
        check_uid_root(root)?;
    }
    let series_uid = derive_uid(root, &["series", &image.sop_instance_uid, &model.digest])?;
    let instance_uid = derive_uid(root, &["instance", &image.sop_instance_uid, &model.digest])?;
    let tracking_uid = derive_uid(root, &["tracking", &image.sop_instance_uid, &model.digest])?;
    let device_uid = derive_uid(root, &["device", &model.digest])?;
    let series_number =
        i32::try_from(options.series_number).map_err(|_| SrError::InvalidOption {
            option: "dicom.sr.series_number",
            reason: "over 2147483647 (IS)".into(),
        })?;
    let (date, time) = utc_date_time(options.created);

    let mut sr = InMemDicomObject::new_empty();
    // SOP Common.
    if let Some(charset) = source
        .element_opt(tags::SPECIFIC_CHARACTER_SET)
        .ok()
        .flatten()
    {
        // The copied names are in the source's character set.
        sr.put(charset.clone());
    }
    sr.put(str_elem(
        tags::SOP_CLASS_UID,
        VR::UI,
        uids::COMPREHENSIVE_SR_STORAGE,
    ));
    sr.put(str_elem(tags::SOP_INSTANCE_UID, VR::UI, &instance_uid));
    sr.put(str_elem(tags::INSTANCE_CREATION_DATE, VR::DA, &date));
    sr.put(str_elem(tags::INSTANCE_CREATION_TIME, VR::TM, &time));
    sr.put(str_elem(tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000"));
    sr.put(seq(
        tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
        vec![object([
            str_elem(
                tags::CODING_SCHEME_DESIGNATOR,
                VR::SH,
                codes::PRIVATE_SCHEME,
            ),
            str_elem(tags::CODING_SCHEME_NAME, VR::ST, codes::PRIVATE_SCHEME_NAME),
            str_elem(
                tags::CODING_SCHEME_VERSION,
                VR::SH,
                codes::PRIVATE_SCHEME_VERSION,
            ),
            str_elem(
                tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
                VR::ST,
                codes::PRIVATE_SCHEME_ORGANIZATION,
            ),
        ])],
    ));
    sr.put(seq(
        tags::CONTRIBUTING_EQUIPMENT_SEQUENCE,
        vec![object([
            code_seq(
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                &codes::PROCESSING_EQUIPMENT,
            ),
            str_elem(tags::MANUFACTURER, VR::LO, MANUFACTURER),
            str_elem(tags::MANUFACTURER_MODEL_NAME, VR::LO, &model.name),
            multi_elem(
                tags::SOFTWARE_VERSIONS,
                VR::LO,
                &[model.version.as_str(), model.digest.as_str()],
            ),
            str_elem(
                tags::CONTRIBUTION_DESCRIPTION,
                VR::ST,
                "AI model that computed the results (Software Versions: version, package SHA-256)",
            ),
        ])],
    ));

    // Patient and General Study: copied from the source, nothing else.
    copy_module(source, &mut sr, PATIENT_MODULE);
    sr.put(str_elem(tags::STUDY_INSTANCE_UID, VR::UI, &image.study_uid));
    copy_module(source, &mut sr, GENERAL_STUDY_MODULE);

    // SR Document Series.
    sr.put(str_elem(tags::MODALITY, VR::CS, "SR"));
    sr.put(str_elem(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid));
    sr.put(str_elem(
        tags::SERIES_NUMBER,
        VR::IS,
        &series_number.to_string(),
    ));
    sr.put(str_elem(tags::SERIES_DATE, VR::DA, &date));
    sr.put(str_elem(tags::SERIES_TIME, VR::TM, &time));
    sr.put(str_elem(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        SERIES_DESCRIPTION,
    ));
    sr.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));

    // General Equipment: oxbox itself.
    sr.put(str_elem(tags::MANUFACTURER, VR::LO, MANUFACTURER));
    sr.put(str_elem(tags::MANUFACTURER_MODEL_NAME, VR::LO, "oxbox"));
    sr.put(str_elem(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        env!("CARGO_PKG_VERSION"),
    ));

    // SR Document General.
    sr.put(str_elem(tags::INSTANCE_NUMBER, VR::IS, "1"));
    sr.put(str_elem(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"));
    sr.put(str_elem(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"));
    sr.put(str_elem(tags::CONTENT_DATE, VR::DA, &date));
    sr.put(str_elem(tags::CONTENT_TIME, VR::TM, &time));
    sr.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    sr.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![object([
            str_elem(tags::STUDY_INSTANCE_UID, VR::UI, &image.study_uid),
            seq(
                tags::REFERENCED_SERIES_SEQUENCE,
                vec![object([
                    str_elem(tags::SERIES_INSTANCE_UID, VR::UI, &image.series_uid),
                    referenced_sop(&image),
                ])],
            ),
        ])],
    ));

    // SR Document Content: the tree.
    let mut group = vec![
        text_item(
            "HAS OBS CONTEXT",
            &codes::TRACKING_IDENTIFIER,
            "oxbox prediction",
        ),
        uidref_item(
            "HAS OBS CONTEXT",
            &codes::TRACKING_UNIQUE_IDENTIFIER,
            &tracking_uid,
        ),
        text_item("CONTAINS", &codes::ALGORITHM_NAME, &model.name),
        text_item("CONTAINS", &codes::ALGORITHM_VERSION, &model.version),
        text_item("CONTAINS", &codes::MODEL_DIGEST, &model.digest),
    ];
    group.extend(
        measurements
            .iter()
            .map(|(code, value)| num_item(code, *value, &image)),
    );
    let content = vec![
        code_item(
            "HAS CONCEPT MOD",
            &codes::LANGUAGE_OF_CONTENT,
            &codes::ENGLISH,
        ),
        code_item("HAS OBS CONTEXT", &codes::OBSERVER_TYPE, &codes::DEVICE),
        uidref_item("HAS OBS CONTEXT", &codes::DEVICE_OBSERVER_UID, &device_uid),
        text_item("HAS OBS CONTEXT", &codes::DEVICE_OBSERVER_NAME, "oxbox"),
        text_item(
            "HAS OBS CONTEXT",
            &codes::DEVICE_OBSERVER_MANUFACTURER,
            MANUFACTURER,
        ),
        text_item(
            "HAS OBS CONTEXT",
            &codes::DEVICE_OBSERVER_MODEL_NAME,
            &model.name,
        ),
        text_item(
            "CONTAINS",
            &codes::COMMENT,
            if options.image_only {
                DISCLAIMER_IMAGE_ONLY
            } else {
                DISCLAIMER
            },
        ),
        container_item(
            "CONTAINS",
            &codes::IMAGING_MEASUREMENTS,
            vec![container_item("CONTAINS", &codes::MEASUREMENT_GROUP, group)],
        ),
    ];
    let root_item = container(None, &codes::IMAGING_MEASUREMENT_REPORT, content);
    for element in root_item {
        sr.put(element);
    }

    sr.with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| SrError::Encode(e.to_string()))
}

/// Writes `sr` to `path` as a Part 10 file, atomically (temporary file,
/// fsync, rename: never a partial file).
///
/// # Errors
/// [`SrError::Encode`] or [`SrError::Output`].
pub fn write(path: &Path, sr: &FileDicomObject<InMemDicomObject>) -> Result<(), SrError> {
    let bytes = to_bytes(sr)?;
    output::write_bytes(path, &bytes)?;
    Ok(())
}

/// `sr` as the bytes of a Part 10 file.
///
/// # Errors
/// [`SrError::Encode`].
pub fn to_bytes(sr: &FileDicomObject<InMemDicomObject>) -> Result<Vec<u8>, SrError> {
    let mut bytes = Vec::new();
    sr.write_all(&mut bytes)
        .map_err(|e| SrError::Encode(e.to_string()))?;
    Ok(bytes)
}

/// A UID derived from `parts` (SHA-256 of them, 128 bits kept): under
/// `root` when given, else a UUID-derived `2.25.` UID (RFC 9562 version 8
/// layout). The same parts give the same UID, so a result made again from
/// the same image and model has the same identity.
///
/// # Errors
/// [`SrError::InvalidOption`] for a root that is not a UID or leaves fewer
/// than 20 digits for the suffix.
pub fn derive_uid(root: Option<&str>, parts: &[&str]) -> Result<String, SrError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"oxbox-sr-uid-v1");
    for part in parts {
        ctx.update(&[0]);
        ctx.update(part.as_bytes());
    }
    let digest = ctx.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    match root {
        None => {
            bytes[6] = (bytes[6] & 0x0f) | 0x80;
            bytes[8] = (bytes[8] & 0x3f) | 0x80;
            Ok(format!("2.25.{}", u128::from_be_bytes(bytes)))
        }
        Some(root) => {
            check_uid_root(root)?;
            let digits = u128::from_be_bytes(bytes).to_string();
            let room = 64 - root.len() - 1;
            Ok(format!("{root}.{}", &digits[..digits.len().min(room)]))
        }
    }
}

fn check_uid_root(root: &str) -> Result<(), SrError> {
    let invalid = |reason: &str| SrError::InvalidOption {
        option: "dicom.sr.uid_root",
        reason: reason.to_owned(),
    };
    if !is_uid(root) {
        return Err(invalid(
            "not a UID root (digits and dots, no empty or zero-led component)",
        ));
    }
    if root.len() > 43 {
        return Err(invalid(
            "longer than 43 characters (a UID has at most 64, 20 digits are added)",
        ));
    }
    Ok(())
}

/// Whether `s` is a syntactically valid UID (PS3.5 §9.1).
fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

fn source_image(source: &InMemDicomObject) -> Result<SourceImage, SrError> {
    let uid = |tag: Tag, keyword: &'static str, tag_name: &'static str| {
        let value = source
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
            .filter(|s| !s.is_empty())
            .ok_or(SrError::MissingAttribute {
                keyword,
                tag: tag_name,
            })?;
        if !is_uid(&value) {
            return Err(SrError::InvalidAttribute {
                keyword,
                tag: tag_name,
                reason: "is not a valid UID",
            });
        }
        Ok(value)
    };
    Ok(SourceImage {
        study_uid: uid(tags::STUDY_INSTANCE_UID, "StudyInstanceUID", "(0020,000D)")?,
        series_uid: uid(
            tags::SERIES_INSTANCE_UID,
            "SeriesInstanceUID",
            "(0020,000E)",
        )?,
        sop_class_uid: uid(tags::SOP_CLASS_UID, "SOPClassUID", "(0008,0016)")?,
        sop_instance_uid: uid(tags::SOP_INSTANCE_UID, "SOPInstanceUID", "(0008,0018)")?,
    })
}

fn check_model(model: &ModelIdentity) -> Result<(), SrError> {
    for (field, value) in [
        ("name", &model.name),
        ("version", &model.version),
        ("digest", &model.digest),
    ] {
        let reason = if value.trim().is_empty() {
            "is empty"
        } else if value.len() > 64 {
            "is over 64 characters (LO)"
        } else if value.contains('\\') || value.chars().any(char::is_control) {
            "holds a backslash or a control character"
        } else {
            continue;
        };
        return Err(SrError::InvalidModel { field, reason });
    }
    Ok(())
}

fn measurements(prediction: &Prediction) -> Result<Vec<(Code, f32)>, SrError> {
    let horizon = |h: &HorizonPrediction, c: [Code; 4], names: [&'static str; 4]| {
        [
            (c[0], h.p_o2_any, names[0]),
            (c[1], h.p_o2_high_flow_or_niv, names[1]),
            (c[2], h.p_ventilation_or_death, names[2]),
            (c[3], h.exam_score, names[3]),
        ]
    };
    let all = horizon(
        &prediction.h24,
        [
            codes::P_O2_ANY_24H,
            codes::P_HFNIV_24H,
            codes::P_VENTDEATH_24H,
            codes::EXAM_SCORE_24H,
        ],
        [
            "24h.p_o2_any",
            "24h.p_o2_high_flow_or_niv",
            "24h.p_ventilation_or_death",
            "24h.exam_score",
        ],
    )
    .into_iter()
    .chain(horizon(
        &prediction.h72,
        [
            codes::P_O2_ANY_72H,
            codes::P_HFNIV_72H,
            codes::P_VENTDEATH_72H,
            codes::EXAM_SCORE_72H,
        ],
        [
            "72h.p_o2_any",
            "72h.p_o2_high_flow_or_niv",
            "72h.p_ventilation_or_death",
            "72h.exam_score",
        ],
    ));
    all.map(|(code, value, item)| {
        if value.is_finite() && (0.0..=1.0).contains(&value) {
            Ok((code, value))
        } else {
            Err(SrError::InvalidPrediction { item, value })
        }
    })
    .collect()
}

fn copy_module(source: &InMemDicomObject, sr: &mut InMemDicomObject, module: &[(Tag, Option<VR>)]) {
    for &(tag, type2) in module {
        match (source.element_opt(tag).ok().flatten(), type2) {
            (Some(element), _) => {
                sr.put(element.clone());
            }
            (None, Some(vr)) => {
                sr.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
            }
            (None, None) => {}
        }
    }
}

/// UTC date (DA) and time (TM) of `t`.
fn utc_date_time(t: SystemTime) -> (String, String) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, (rem % 3600) / 60, rem % 60),
    )
}

// --- element and content item builders -------------------------------------

type Element = DataElement<InMemDicomObject>;

fn str_elem(tag: Tag, vr: VR, value: &str) -> Element {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn multi_elem(tag: Tag, vr: VR, values: &[&str]) -> Element {
    DataElement::new(
        tag,
        vr,
        PrimitiveValue::Strs(values.iter().map(|s| (*s).to_owned()).collect()),
    )
}

fn object<const N: usize>(elements: [Element; N]) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> Element {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code_object(code: &Code) -> InMemDicomObject {
    object([
        str_elem(tags::CODE_VALUE, VR::SH, code.value),
        str_elem(tags::CODING_SCHEME_DESIGNATOR, VR::SH, code.scheme),
        str_elem(tags::CODE_MEANING, VR::LO, code.meaning),
    ])
}

fn code_seq(tag: Tag, code: &Code) -> Element {
    seq(tag, vec![code_object(code)])
}

fn referenced_sop(image: &SourceImage) -> Element {
    seq(
        tags::REFERENCED_SOP_SEQUENCE,
        vec![object([
            str_elem(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &image.sop_class_uid),
            str_elem(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &image.sop_instance_uid,
            ),
        ])],
    )
}

/// A content item's common attributes: relationship (absent on the root),
/// value type, concept name.
fn item_head(relationship: Option<&str>, value_type: &str, concept: &Code) -> Vec<Element> {
    let mut head = Vec::with_capacity(4);
    if let Some(relationship) = relationship {
        head.push(str_elem(tags::RELATIONSHIP_TYPE, VR::CS, relationship));
    }
    head.push(str_elem(tags::VALUE_TYPE, VR::CS, value_type));
    head.push(code_seq(tags::CONCEPT_NAME_CODE_SEQUENCE, concept));
    head
}

fn container(
    relationship: Option<&str>,
    concept: &Code,
    children: Vec<InMemDicomObject>,
) -> Vec<Element> {
    let mut item = item_head(relationship, "CONTAINER", concept);
    item.push(str_elem(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    item.push(seq(tags::CONTENT_SEQUENCE, children));
    item
}

fn container_item(
    relationship: &str,
    concept: &Code,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(container(Some(relationship), concept, children))
}

fn text_item(relationship: &str, concept: &Code, text: &str) -> InMemDicomObject {
    let mut item = item_head(Some(relationship), "TEXT", concept);
    item.push(str_elem(tags::TEXT_VALUE, VR::UT, text));
    InMemDicomObject::from_element_iter(item)
}

fn code_item(relationship: &str, concept: &Code, value: &Code) -> InMemDicomObject {
    let mut item = item_head(Some(relationship), "CODE", concept);
    item.push(code_seq(tags::CONCEPT_CODE_SEQUENCE, value));
    InMemDicomObject::from_element_iter(item)
}

fn uidref_item(relationship: &str, concept: &Code, uid: &str) -> InMemDicomObject {
    let mut item = item_head(Some(relationship), "UIDREF", concept);
    item.push(str_elem(tags::UID, VR::UI, uid));
    InMemDicomObject::from_element_iter(item)
}

fn num_item(concept: &Code, value: f32, image: &SourceImage) -> InMemDicomObject {
    let mut item = item_head(Some("CONTAINS"), "NUM", concept);
    item.push(seq(
        tags::MEASURED_VALUE_SEQUENCE,
        vec![object([
            code_seq(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, &codes::NO_UNITS),
            // DS holds at most 16 characters: six decimals here, the exact
            // value in Floating Point Value.
            str_elem(tags::NUMERIC_VALUE, VR::DS, &format!("{value:.6}")),
            DataElement::new(
                tags::FLOATING_POINT_VALUE,
                VR::FD,
                PrimitiveValue::from(f64::from(value)),
            ),
        ])],
    ));
    let mut source = item_head(
        Some("INFERRED FROM"),
        "IMAGE",
        &codes::SOURCE_OF_MEASUREMENT,
    );
    source.push(referenced_sop(image));
    item.push(seq(
        tags::CONTENT_SEQUENCE,
        vec![InMemDicomObject::from_element_iter(source)],
    ));
    InMemDicomObject::from_element_iter(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::dicom::DicomFile;

    fn sample() -> FileDicomObject<InMemDicomObject> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/chest-cr-sample.dcm");
        DicomFile::open(&path, &LimitsConfig::default())
            .expect("sample radiograph")
            .object()
            .clone()
    }

    fn model(digest: &str) -> ModelIdentity {
        ModelIdentity {
            name: "exam-demo".into(),
            version: "1.2.3".into(),
            digest: digest.into(),
            trained: true,
        }
    }

    fn prediction() -> Prediction {
        let h = |a, b, c, s| HorizonPrediction {
            p_o2_any: a,
            p_o2_high_flow_or_niv: b,
            p_ventilation_or_death: c,
            exam_score: s,
        };
        Prediction {
            h24: h(0.61, 0.22, 0.05, 0.31),
            h72: h(0.75, 0.35, 0.125, 0.42),
        }
    }

    const DIGEST: &str = "8f2b1c0e6a3d4f5e8f2b1c0e6a3d4f5e8f2b1c0e6a3d4f5e8f2b1c0e6a3d4f5e";

    fn text(obj: &InMemDicomObject, tag: Tag) -> String {
        obj.element(tag)
            .unwrap_or_else(|_| panic!("{tag} present"))
            .to_str()
            .expect("text")
            .trim_end_matches(['\0', ' '])
            .to_owned()
    }

    fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
        obj.element(tag)
            .unwrap_or_else(|_| panic!("{tag} present"))
            .items()
            .expect("a sequence")
    }

    fn concept(item: &InMemDicomObject) -> String {
        text(
            &items(item, tags::CONCEPT_NAME_CODE_SEQUENCE)[0],
            tags::CODE_VALUE,
        )
    }

    #[test]
    fn sr_copies_patient_and_study_only_and_carries_the_prediction() {
        let source = sample();
        let sr = build_from(
            &source,
            &model(DIGEST),
            &prediction(),
            &SrOptions::default(),
        )
        .expect("SR");
        assert_eq!(sr.meta().transfer_syntax(), uids::EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(
            sr.meta().media_storage_sop_class_uid(),
            uids::COMPREHENSIVE_SR_STORAGE
        );
        assert_eq!(
            text(&sr, tags::SOP_CLASS_UID),
            uids::COMPREHENSIVE_SR_STORAGE
        );
        assert_eq!(text(&sr, tags::MODALITY), "SR");
        assert_eq!(text(&sr, tags::VERIFICATION_FLAG), "UNVERIFIED");
        assert_eq!(text(&sr, tags::COMPLETION_FLAG), "COMPLETE");
        assert!(text(&sr, tags::SERIES_DESCRIPTION).contains("NOT FOR DIAGNOSTIC USE"));
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::STUDY_INSTANCE_UID,
        ] {
            assert_eq!(text(&sr, tag), text(&source, tag), "{tag} copied");
        }
        // New identity, nothing else of the source.
        for tag in [tags::SERIES_INSTANCE_UID, tags::SOP_INSTANCE_UID] {
            assert_ne!(text(&sr, tag), text(&source, tag), "{tag} is new");
        }
        for tag in [
            tags::PIXEL_DATA,
            tags::ROWS,
            tags::BODY_PART_EXAMINED,
            tags::VIEW_POSITION,
        ] {
            assert!(source.element(tag).is_ok(), "the sample has {tag}");
            assert!(sr.element(tag).is_err(), "{tag} not copied");
        }
        assert_eq!(text(&sr, tags::MANUFACTURER), MANUFACTURER);

        // Evidence: the source image.
        let evidence = &items(&sr, tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)[0];
        let series = &items(evidence, tags::REFERENCED_SERIES_SEQUENCE)[0];
        assert_eq!(
            text(series, tags::SERIES_INSTANCE_UID),
            text(&source, tags::SERIES_INSTANCE_UID)
        );
        let sop = &items(series, tags::REFERENCED_SOP_SEQUENCE)[0];
        assert_eq!(
            text(sop, tags::REFERENCED_SOP_INSTANCE_UID),
            text(&source, tags::SOP_INSTANCE_UID)
        );

        // The model as contributing equipment.
        let equipment = &items(&sr, tags::CONTRIBUTING_EQUIPMENT_SEQUENCE)[0];
        assert_eq!(
            concept_of(equipment, tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE),
            "109102"
        );
        assert_eq!(text(equipment, tags::MANUFACTURER_MODEL_NAME), "exam-demo");
        assert_eq!(
            text(equipment, tags::SOFTWARE_VERSIONS),
            format!("1.2.3\\{DIGEST}")
        );
        let scheme = &items(&sr, tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE)[0];
        assert_eq!(text(scheme, tags::CODING_SCHEME_DESIGNATOR), "99OXBOX");

        // The content tree.
        assert_eq!(text(&sr, tags::VALUE_TYPE), "CONTAINER");
        assert_eq!(concept(&sr), "126000");
        let root = items(&sr, tags::CONTENT_SEQUENCE);
        let measurements = root
            .iter()
            .find(|i| concept(i) == "126010")
            .expect("Imaging Measurements");
        let group = &items(measurements, tags::CONTENT_SEQUENCE)[0];
        assert_eq!(concept(group), "125007");
        let group = items(group, tags::CONTENT_SEQUENCE);
        let nums: Vec<(String, f64, String)> = group
            .iter()
            .filter(|i| text(i, tags::VALUE_TYPE) == "NUM")
            .map(|i| {
                let value = &items(i, tags::MEASURED_VALUE_SEQUENCE)[0];
                let image = &items(i, tags::CONTENT_SEQUENCE)[0];
                assert_eq!(text(image, tags::RELATIONSHIP_TYPE), "INFERRED FROM");
                let sop = &items(image, tags::REFERENCED_SOP_SEQUENCE)[0];
                (
                    concept(i),
                    value
                        .element(tags::FLOATING_POINT_VALUE)
                        .expect("FD")
                        .to_float64()
                        .expect("f64"),
                    text(sop, tags::REFERENCED_SOP_INSTANCE_UID),
                )
            })
            .collect();
        let p = prediction();
        let expected = [
            ("P-O2-ANY-24H", p.h24.p_o2_any),
            ("P-HFNIV-24H", p.h24.p_o2_high_flow_or_niv),
            ("P-VENTDEATH-24H", p.h24.p_ventilation_or_death),
            ("EXAM-SCORE-24H", p.h24.exam_score),
            ("P-O2-ANY-72H", p.h72.p_o2_any),
            ("P-HFNIV-72H", p.h72.p_o2_high_flow_or_niv),
            ("P-VENTDEATH-72H", p.h72.p_ventilation_or_death),
            ("EXAM-SCORE-72H", p.h72.exam_score),
        ];
        assert_eq!(nums.len(), expected.len());
        for ((code, value, sop), (want_code, want)) in nums.iter().zip(expected) {
            assert_eq!(code, want_code);
            assert_eq!(*value, f64::from(want), "{code}");
            assert_eq!(*sop, text(&source, tags::SOP_INSTANCE_UID));
        }
        let digest = group
            .iter()
            .find(|i| concept(i) == "MODEL-DIGEST")
            .expect("digest item");
        assert_eq!(text(digest, tags::TEXT_VALUE), DIGEST);

        // Written and read back.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sr.dcm");
        write(&path, &sr).expect("write");
        let back = dicom_object::open_file(&path).expect("reads back");
        assert_eq!(
            text(&back, tags::SOP_INSTANCE_UID),
            text(&sr, tags::SOP_INSTANCE_UID)
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "sr.dcm")
            .collect();
        assert!(
            leftovers.is_empty(),
            "no temporary file left: {leftovers:?}"
        );
    }

    #[test]
    fn an_image_only_result_says_it_had_no_emr_record() {
        let source = sample();
        let comment = |image_only: bool| {
            let options = SrOptions {
                image_only,
                ..SrOptions::default()
            };
            let sr = build_from(&source, &model(DIGEST), &prediction(), &options).expect("SR");
            let comments: Vec<String> = items(&sr, tags::CONTENT_SEQUENCE)
                .iter()
                .filter(|item| concept(item) == codes::COMMENT.value)
                .map(|item| text(item, tags::TEXT_VALUE))
                .collect();
            assert_eq!(comments.len(), 1, "{comments:?}");
            comments[0].clone()
        };
        assert_eq!(comment(false), DISCLAIMER);
        assert_eq!(comment(true), DISCLAIMER_IMAGE_ONLY);
        assert!(DISCLAIMER_IMAGE_ONLY.contains("without an EMR record"));
        assert!(DISCLAIMER_IMAGE_ONLY.ends_with("NOT FOR DIAGNOSTIC USE."));
        assert!(DISCLAIMER_IMAGE_ONLY.len() <= 1024, "a short UT");
    }

    fn concept_of(obj: &InMemDicomObject, tag: Tag) -> String {
        text(&items(obj, tag)[0], tags::CODE_VALUE)
    }

    #[test]
    fn uids_are_derived_from_the_source_and_model() {
        let source = sample();
        let uids_of = |digest: &str, root: Option<&str>| {
            let options = SrOptions {
                uid_root: root.map(str::to_owned),
                ..SrOptions::default()
            };
            let sr = build_from(&source, &model(digest), &prediction(), &options).expect("SR");
            (
                text(&sr, tags::SERIES_INSTANCE_UID),
                text(&sr, tags::SOP_INSTANCE_UID),
            )
        };
        let a = uids_of(DIGEST, None);
        assert_eq!(a, uids_of(DIGEST, None), "same image and model: same UIDs");
        let other = DIGEST.replace('8', "9");
        let b = uids_of(&other, None);
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
        assert_ne!(a.0, a.1);
        for uid in [&a.0, &a.1, &b.0, &b.1] {
            assert!(
                uid.starts_with("2.25.") && is_uid(uid) && uid.len() <= 64,
                "{uid}"
            );
        }
        let rooted = uids_of(DIGEST, Some("1.2.826.0.1.3680043.10.999"));
        assert!(rooted.1.starts_with("1.2.826.0.1.3680043.10.999."));
        assert!(is_uid(&rooted.1) && rooted.1.len() <= 64);
        let long_root = "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19";
        let err = derive_uid(Some(long_root), &["x"]).expect_err("too long");
        assert!(err.to_string().contains("dicom.sr.uid_root"), "{err}");
        assert!(
            derive_uid(Some("1.02.3"), &["x"]).is_err(),
            "zero-led component"
        );
        assert!(derive_uid(Some("1..3"), &["x"]).is_err(), "empty component");
    }

    #[test]
    fn source_errors_name_the_attribute_never_its_value() {
        let mut source = sample();
        let sop_instance = text(&source, tags::SOP_INSTANCE_UID);
        source.remove_element(tags::SOP_INSTANCE_UID);
        let err = build_from(
            &source,
            &model(DIGEST),
            &prediction(),
            &SrOptions::default(),
        )
        .expect_err("no SOP Instance UID");
        assert!(matches!(
            err,
            SrError::MissingAttribute {
                keyword: "SOPInstanceUID",
                ..
            }
        ));

        let mut source = sample();
        let bad = format!("{sop_instance}.X");
        source.put(str_elem(tags::SOP_INSTANCE_UID, VR::UI, &bad));
        let err = build_from(
            &source,
            &model(DIGEST),
            &prediction(),
            &SrOptions::default(),
        )
        .expect_err("invalid UID");
        let message = err.to_string();
        assert!(message.contains("SOPInstanceUID (0008,0018)"), "{message}");
        assert!(!message.contains(&sop_instance), "value quoted: {message}");

        let mut source = sample();
        source.remove_element(tags::STUDY_INSTANCE_UID);
        let err = build_from(
            &source,
            &model(DIGEST),
            &prediction(),
            &SrOptions::default(),
        )
        .expect_err("no study");
        assert!(err.to_string().contains("StudyInstanceUID"), "{err}");
    }

    #[test]
    fn out_of_range_predictions_and_bad_identities_are_refused() {
        let source = sample();
        let mut p = prediction();
        p.h72.p_ventilation_or_death = f32::NAN;
        let err = build_from(&source, &model(DIGEST), &p, &SrOptions::default()).expect_err("NaN");
        assert!(
            err.to_string().contains("72h.p_ventilation_or_death"),
            "{err}"
        );
        let mut p = prediction();
        p.h24.exam_score = 1.5;
        assert!(build_from(&source, &model(DIGEST), &p, &SrOptions::default()).is_err());
        let mut m = model(DIGEST);
        m.version = "1\\2".into();
        let err =
            build_from(&source, &m, &prediction(), &SrOptions::default()).expect_err("backslash");
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn type_2_attributes_missing_from_the_source_are_written_empty() {
        let mut source = sample();
        source.remove_element(tags::ACCESSION_NUMBER);
        source.remove_element(tags::REFERRING_PHYSICIAN_NAME);
        let sr = build_from(
            &source,
            &model(DIGEST),
            &prediction(),
            &SrOptions::default(),
        )
        .expect("SR");
        for tag in [tags::ACCESSION_NUMBER, tags::REFERRING_PHYSICIAN_NAME] {
            assert_eq!(text(&sr, tag), "", "{tag} present and empty");
        }
    }

    #[test]
    fn utc_dates_are_civil_dates() {
        let at = |s| utc_date_time(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), ("19700101".into(), "000000".into()));
        assert_eq!(at(951_825_599), ("20000229".into(), "115959".into()));
        assert_eq!(at(1_798_675_200), ("20261231".into(), "000000".into()));
    }
}
