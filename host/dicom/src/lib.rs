//! DICOM ingest: a chest-radiograph file in, the model-ready tensor out.
//!
//! The stage runs in four steps, one module each:
//!
//! 1. [`read`]: bytes → parsed DICOM object. Accepts files with or without the
//!    128-byte preamble and with or without a file meta group; refuses files
//!    over the size limit before reading them, and walks the element
//!    structure first ([`scan`]: every declared length within the bytes that
//!    remain, sequence nesting and inflated size bounded, no recursion) so
//!    that the parser allocates no more than the file holds.
//! 2. [`header`]: the parsed object → [`ImageHeader`], every attribute the
//!    canonical preprocessing needs, type- and range-checked. Colour images,
//!    missing pixel data and images over the size limit are refused here,
//!    before any pixel buffer is allocated.
//! 3. [`pixels`]: frame 1 → samples and the rule to their stored values, whatever the transfer syntax
//!    (native, deflated, RLE, JPEG in all its processes, JPEG-LS, JPEG 2000).
//! 4. [`canonical`]: stored values → the (1, S, S) float32 tensor of
//!    *canonical chest-radiograph preprocessing v1*.
//!
//! Nothing in this crate logs or returns patient identifiers: errors name
//! attributes by keyword and tag, never by value, except for the coded values
//! that explain a refusal (photometric interpretation, transfer syntax).

pub mod canonical;
pub mod guard;
pub mod header;
pub mod limits;
pub mod pixels;
pub mod read;
pub mod scan;

mod jpeg;
mod rle;

use std::path::Path;

pub use canonical::{CanonicalImage, VoiMethod};
pub use header::{Geometry, ImageHeader};
pub use limits::LimitsConfig;
pub use pixels::{DecodedFrame, Samples, StoredBits};
pub use read::DicomFile;

/// Everything that can go wrong between a file and a tensor.
///
/// Each variant names its cause precisely enough for an operator to act on
/// it, and none carries patient data.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The input is empty.
    #[error("empty input: a DICOM file has at least a data set")]
    Empty,
    /// The input is larger than `limits.max_dicom_file_mib`.
    #[error("file is {size} bytes, over the limit of {limit} bytes (limits.max_dicom_file_mib)")]
    FileTooLarge {
        /// Size of the input.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The bytes are not a DICOM data set (or stop in the middle of one).
    #[error("not a readable DICOM file: {reason}")]
    NotDicom {
        /// What the parser said.
        reason: String,
    },
    /// A required attribute is absent.
    #[error("missing attribute {keyword} {tag}")]
    MissingAttribute {
        /// DICOM keyword, e.g. `Rows`.
        keyword: &'static str,
        /// The tag, as `(gggg,eeee)`.
        tag: &'static str,
    },
    /// An attribute is present but its value cannot be used.
    #[error("invalid attribute {keyword} {tag}: {reason}")]
    InvalidAttribute {
        /// DICOM keyword.
        keyword: &'static str,
        /// The tag, as `(gggg,eeee)`.
        tag: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// The image is not a grayscale radiograph.
    #[error(
        "unsupported photometric interpretation {0:?} (0028,0004): a chest radiograph must be MONOCHROME1 or MONOCHROME2"
    )]
    NotGrayscale(String),
    /// The image is larger than `limits.max_image_megapixels`.
    #[error(
        "image is {rows}x{columns} = {pixels} pixels, over the limit of {limit} pixels (limits.max_image_megapixels)"
    )]
    ImageTooLarge {
        /// Rows (0028,0010).
        rows: u32,
        /// Columns (0028,0011).
        columns: u32,
        /// rows × columns.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The transfer syntax is one this box cannot decode.
    #[error("unsupported transfer syntax {uid} ({name}) (0002,0010)")]
    UnsupportedTransferSyntax {
        /// The UID.
        uid: String,
        /// Its name, where known.
        name: String,
    },
    /// The pixel data is shorter than the header says, or otherwise malformed.
    #[error("invalid pixel data (7FE0,0010): {reason}")]
    InvalidPixelData {
        /// What is wrong.
        reason: String,
    },
    /// An element, item or fragment declares a value longer than the bytes
    /// that remain in the input (found by the structural pre-scan, before
    /// anything is allocated for it).
    #[error("{at} declares {declared} bytes but only {remaining} remain")]
    LengthBeyondInput {
        /// What declared it, e.g. `element (7FE0,0010)`.
        at: String,
        /// The declared length.
        declared: u64,
        /// Bytes left in the input after its header.
        remaining: u64,
    },
    /// Sequences nest deeper than [`scan::MAX_SEQUENCE_DEPTH`].
    #[error("{at} nests deeper than the limit of {limit} sequences")]
    NestingTooDeep {
        /// The sequence that went one level too deep, e.g. `sequence (0040,A730)`.
        at: String,
        /// The limit.
        limit: usize,
    },
    /// The data set holds more than [`scan::MAX_DATA_SET_NODES`] elements,
    /// items, fragments and string values.
    #[error("more than {limit} elements, items and values in the data set (at {at})")]
    TooManyElements {
        /// Where the count went over, e.g. `element (0020,0037)`.
        at: String,
        /// The limit.
        limit: u64,
    },
    /// A deflated data set inflates past `limits.max_inflated_mib`.
    #[error(
        "deflated data set (0002,0010) {uid} inflates past the limit of {limit} bytes (limits.max_inflated_mib): {at} would end at inflated byte {end}"
    )]
    InflatedTooLarge {
        /// The transfer syntax UID.
        uid: String,
        /// What crossed the limit, e.g. `element (7FE0,0010)`.
        at: String,
        /// Where it would end in the inflated data set.
        end: u64,
        /// The configured limit, in bytes.
        limit: u64,
    },
    /// The element structure is broken where dicom-rs would refuse it or
    /// read it in more than one way.
    #[error("malformed data set at {at}: {reason}")]
    Malformed {
        /// Where, e.g. `sequence (0008,1140)`.
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// The compressed stream could not be decoded.
    #[error("corrupt {codec} stream in pixel data (7FE0,0010): {reason}")]
    CorruptStream {
        /// The codec, e.g. `JPEG 2000`.
        codec: &'static str,
        /// What the decoder said.
        reason: String,
    },
}

/// Result alias for this stage.
pub type Result<T, E = DicomError> = std::result::Result<T, E>;

/// Reads `path`, decodes frame 1 and runs canonical preprocessing at size `size`.
///
/// This is the whole ingest path that `oxbox preprocess` and (later) the HTTP
/// endpoint use.
///
/// # Errors
/// Any [`DicomError`]: unreadable or non-DICOM input, a refused image
/// (colour, too large, unsupported encoding), or corrupt pixel data.
pub fn preprocess_file(path: &Path, size: u32, limits: &LimitsConfig) -> Result<CanonicalImage> {
    let file = DicomFile::open(path, limits)?;
    preprocess(&file, size, limits)
}

/// Decodes frame 1 of an already-read file and runs canonical preprocessing.
///
/// # Errors
/// As [`preprocess_file`], without the read step.
pub fn preprocess(file: &DicomFile, size: u32, limits: &LimitsConfig) -> Result<CanonicalImage> {
    let header = ImageHeader::read(file)?;
    let geometry = header.accept(limits)?;
    let frame = pixels::decode_first_frame(file, &geometry)?;
    Ok(canonical::preprocess(&header, &geometry, &frame, size))
}
