//! The coded concepts of the result SR: DICOM's own (DCM, PS3.16), UCUM for
//! units, and oxbox's private coding scheme `99OXBOX` for the model's
//! outputs, which no standard terminology names.
//!
//! `99OXBOX` is a private scheme in the sense of PS3.16 §8.2 (designators
//! starting with "99" are reserved for local use). It is declared in every
//! SR's Coding Scheme Identification Sequence and documented in
//! `firmware-notes/dicom-conformance.md`; its codes never change meaning (a new output
//! gets a new code, and [`PRIVATE_SCHEME_VERSION`] is raised).

/// A coded concept: value, coding scheme designator and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// Code Value (0008,0100), at most 16 characters.
    pub value: &'static str,
    /// Coding Scheme Designator (0008,0102).
    pub scheme: &'static str,
    /// Code Meaning (0008,0104), at most 64 characters.
    pub meaning: &'static str,
}

const fn dcm(value: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme: "DCM",
        meaning,
    }
}

const fn oxbox(value: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme: PRIVATE_SCHEME,
        meaning,
    }
}

/// Designator of oxbox's private coding scheme.
pub const PRIVATE_SCHEME: &str = "99OXBOX";
/// Coding Scheme Name of [`PRIVATE_SCHEME`].
pub const PRIVATE_SCHEME_NAME: &str = "oxbox result codes";
/// Coding Scheme Version of [`PRIVATE_SCHEME`].
pub const PRIVATE_SCHEME_VERSION: &str = "1";
/// Coding Scheme Responsible Organization of [`PRIVATE_SCHEME`].
pub const PRIVATE_SCHEME_ORGANIZATION: &str = "oxbox project";

// --- DICOM (DCM) ---------------------------------------------------------

/// Root container's concept (as TID 1500's root).
pub const IMAGING_MEASUREMENT_REPORT: Code = dcm("126000", "Imaging Measurement Report");
/// Language of the content.
pub const LANGUAGE_OF_CONTENT: Code = dcm("121049", "Language of Content Item and Descendants");
/// English, in RFC 5646.
pub const ENGLISH: Code = Code {
    value: "en",
    scheme: "RFC5646",
    meaning: "English",
};
/// Observer type (TID 1002).
pub const OBSERVER_TYPE: Code = dcm("121005", "Observer Type");
/// The observer is a device (TID 1004).
pub const DEVICE: Code = dcm("121007", "Device");
/// Device observer UID.
pub const DEVICE_OBSERVER_UID: Code = dcm("121012", "Device Observer UID");
/// Device observer name.
pub const DEVICE_OBSERVER_NAME: Code = dcm("121013", "Device Observer Name");
/// Device observer manufacturer.
pub const DEVICE_OBSERVER_MANUFACTURER: Code = dcm("121014", "Device Observer Manufacturer");
/// Device observer model name.
pub const DEVICE_OBSERVER_MODEL_NAME: Code = dcm("121015", "Device Observer Model Name");
/// The measurements container (as TID 1500).
pub const IMAGING_MEASUREMENTS: Code = dcm("126010", "Imaging Measurements");
/// One measurement group (as TID 1501).
pub const MEASUREMENT_GROUP: Code = dcm("125007", "Measurement Group");
/// Tracking identifier of the group.
pub const TRACKING_IDENTIFIER: Code = dcm("112039", "Tracking Identifier");
/// Tracking unique identifier of the group.
pub const TRACKING_UNIQUE_IDENTIFIER: Code = dcm("112040", "Tracking Unique Identifier");
/// Algorithm name (TID 4019).
pub const ALGORITHM_NAME: Code = dcm("111001", "Algorithm Name");
/// Algorithm version (TID 4019).
pub const ALGORITHM_VERSION: Code = dcm("111003", "Algorithm Version");
/// The image a measurement was inferred from.
pub const SOURCE_OF_MEASUREMENT: Code = dcm("121112", "Source of Measurement");
/// A free-text comment.
pub const COMMENT: Code = dcm("121106", "Comment");
/// Contributing equipment's purpose: equipment that processed data to
/// produce this instance (CID 7005). "Modifying Equipment" (109103) is for
/// equipment that changed an existing instance, which oxbox never does.
pub const PROCESSING_EQUIPMENT: Code = dcm("109102", "Processing Equipment");

// --- UCUM ----------------------------------------------------------------

/// Dimensionless unit of the probabilities and scores.
pub const NO_UNITS: Code = Code {
    value: "1",
    scheme: "UCUM",
    meaning: "no units",
};

// --- oxbox (99OXBOX) -----------------------------------------------------

/// P(any supplemental oxygen) within 24 h.
pub const P_O2_ANY_24H: Code = oxbox(
    "P-O2-ANY-24H",
    "Probability of any supplemental oxygen within 24 hours",
);
/// P(high-flow oxygen or NIV) within 24 h.
pub const P_HFNIV_24H: Code = oxbox(
    "P-HFNIV-24H",
    "Probability of high-flow oxygen or NIV within 24 hours",
);
/// P(mechanical ventilation or death) within 24 h.
pub const P_VENTDEATH_24H: Code = oxbox(
    "P-VENTDEATH-24H",
    "Probability of mechanical ventilation or death within 24 hours",
);
/// Exam score (expected oxygen level / 4) at 24 h.
pub const EXAM_SCORE_24H: Code = oxbox(
    "EXAM-SCORE-24H",
    "EXAM score (expected oxygen level / 4) at 24 hours",
);
/// P(any supplemental oxygen) within 72 h.
pub const P_O2_ANY_72H: Code = oxbox(
    "P-O2-ANY-72H",
    "Probability of any supplemental oxygen within 72 hours",
);
/// P(high-flow oxygen or NIV) within 72 h.
pub const P_HFNIV_72H: Code = oxbox(
    "P-HFNIV-72H",
    "Probability of high-flow oxygen or NIV within 72 hours",
);
/// P(mechanical ventilation or death) within 72 h.
pub const P_VENTDEATH_72H: Code = oxbox(
    "P-VENTDEATH-72H",
    "Probability of mechanical ventilation or death within 72 hours",
);
/// Exam score (expected oxygen level / 4) at 72 h.
pub const EXAM_SCORE_72H: Code = oxbox(
    "EXAM-SCORE-72H",
    "EXAM score (expected oxygen level / 4) at 72 hours",
);
/// The model package's digest (SHA-256, hex).
pub const MODEL_DIGEST: Code = oxbox("MODEL-DIGEST", "Model package digest (SHA-256)");

/// Every private code, in the order the SR carries them.
pub const PRIVATE_CODES: [Code; 9] = [
    P_O2_ANY_24H,
    P_HFNIV_24H,
    P_VENTDEATH_24H,
    EXAM_SCORE_24H,
    P_O2_ANY_72H,
    P_HFNIV_72H,
    P_VENTDEATH_72H,
    EXAM_SCORE_72H,
    MODEL_DIGEST,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_codes_fit_their_value_representations_and_are_distinct() {
        let mut values = std::collections::BTreeSet::new();
        for code in PRIVATE_CODES {
            assert!(code.value.len() <= 16, "{} over SH's 16", code.value);
            assert!(code.meaning.len() <= 64, "{} over LO's 64", code.meaning);
            assert!(code.value.is_ascii() && code.meaning.is_ascii());
            assert_eq!(code.scheme, PRIVATE_SCHEME);
            assert!(values.insert(code.value), "{} twice", code.value);
        }
    }
}
