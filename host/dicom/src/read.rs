//! Reading: bytes → a parsed DICOM object (dicom-object), pixels untouched.
//!
//! Trusts nothing: the size is checked before reading; the element
//! structure is then walked as a stream ([`super::scan`]), so that no length
//! field, nesting or deflated stream can make the parser allocate more than
//! the file holds or recurse deeper than a fixed bound; only then does
//! dicom-rs parse, from the same bytes (a file is read twice, never held
//! twice). The three layouts seen in the wild are accepted:
//! - a Part 10 file: 128-byte preamble, `DICM`, file meta group, data set;
//! - the same without the preamble (starting at `DICM`, or directly at the
//!   file meta group);
//! - a bare data set with no file meta group at all (old modalities, raw
//!   exports). Its encoding is detected from the first element header:
//!   explicit or implicit VR, little or big endian.
//!
//! A file is read twice (scan, then parse): one changed in place between the
//! two reads is outside what this guards (the server parses uploads from
//! memory, where both passes see the same bytes).

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{
    FileDicomObject, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions, file::ReadPreamble,
};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::scan::{self, Footprint};
use super::{DicomError, Result};
use crate::LimitsConfig;

/// Explicit VR Big Endian: retired from the standard (so deprecated in the
/// dictionary), still found in archives, and still read here.
pub(crate) const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// A parsed DICOM file, with how it was laid out.
pub struct DicomFile {
    object: FileDicomObject<InMemDicomObject>,
    has_file_meta: bool,
}

impl std::fmt::Debug for DicomFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Deliberately no attribute values: they may identify the patient.
        f.debug_struct("DicomFile")
            .field("transfer_syntax", &self.transfer_syntax())
            .field("has_file_meta", &self.has_file_meta)
            .finish_non_exhaustive()
    }
}

impl DicomFile {
    /// Opens and parses `path`, refusing files over `limits.max_dicom_file_mib`
    /// and files whose structure fails the pre-scan ([`super::scan`]). A
    /// regular file is streamed (never held whole); anything else (a pipe,
    /// `/dev/stdin`) is read into memory under the same limit first.
    ///
    /// # Errors
    /// [`DicomError::Io`], [`DicomError::FileTooLarge`], [`DicomError::Empty`],
    /// [`DicomError::NotDicom`], or a refusal of the structural scan
    /// ([`DicomError::LengthBeyondInput`], [`DicomError::NestingTooDeep`],
    /// [`DicomError::TooManyElements`], [`DicomError::InflatedTooLarge`],
    /// [`DicomError::Malformed`], [`DicomError::UnsupportedTransferSyntax`]).
    pub fn open(path: &Path, limits: &LimitsConfig) -> Result<Self> {
        let name = path.display().to_string();
        let io = |source| DicomError::Io {
            path: name.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let metadata = file.metadata().map_err(io)?;
        let limit = limits.max_dicom_file_bytes();
        if !metadata.is_file() {
            // A pipe, FIFO or terminal (`--dicom /dev/stdin`): no length to
            // check first, no second pass. Read at most one byte past the
            // limit into memory (a size over the limit is then the bytes
            // read so far) and parse from there.
            let mut bytes = Vec::new();
            (&mut file)
                .take(limit.saturating_add(1))
                .read_to_end(&mut bytes)
                .map_err(io)?;
            return Self::from_bytes(&bytes, limits);
        }
        let size = metadata.len();
        if size > limit {
            return Err(DicomError::FileTooLarge { size, limit });
        }
        // The first bytes tell the layout; the rest streams twice: through
        // the structural scan, then from the same offset into the parser. No
        // copy of the file is held. `take` keeps both passes to the bytes the
        // size check saw, should the file grow meanwhile.
        let mut prefix = Vec::with_capacity(PREFIX_LEN);
        (&mut file)
            .take(PREFIX_LEN as u64)
            .read_to_end(&mut prefix)
            .map_err(io)?;
        let layout = Layout::detect(&prefix)?;
        let rest_len = size.saturating_sub(prefix.len() as u64);
        let from = layout.scan_from().min(prefix.len());
        let rest = BufReader::with_capacity(SCAN_BUFFER, (&mut file).take(rest_len));
        scan_guarded(
            layout,
            (&prefix[from..]).chain(rest),
            size.saturating_sub(from as u64),
            limits,
            &name,
        )?;
        file.seek(SeekFrom::Start(prefix.len() as u64))
            .map_err(io)?;
        parse_guarded(&prefix, layout, file.take(rest_len))
    }

    /// Parses a DICOM file held in memory.
    ///
    /// # Errors
    /// As [`DicomFile::open`], without the I/O errors.
    pub fn from_bytes(bytes: &[u8], limits: &LimitsConfig) -> Result<Self> {
        DicomFile::scan_bytes(bytes, limits)?.parse()
    }

    /// The first half of [`DicomFile::from_bytes`]: checks the size and
    /// runs the structural scan, so that the caller can admit the parse by
    /// its [`Footprint`] (the inflated size of a deflated data set, not the
    /// file's) before [`ScannedBytes::parse`] allocates it.
    ///
    /// # Errors
    /// As [`DicomFile::from_bytes`].
    pub fn scan_bytes<'a>(bytes: &'a [u8], limits: &LimitsConfig) -> Result<ScannedBytes<'a>> {
        let limit = limits.max_dicom_file_bytes();
        if bytes.len() as u64 > limit {
            return Err(DicomError::FileTooLarge {
                size: bytes.len() as u64,
                limit,
            });
        }
        let prefix_len = bytes.len().min(PREFIX_LEN);
        let layout = Layout::detect(&bytes[..prefix_len])?;
        let from = layout.scan_from().min(bytes.len());
        let footprint = scan_guarded(
            layout,
            &bytes[from..],
            (bytes.len() - from) as u64,
            limits,
            "the DICOM input",
        )?;
        Ok(ScannedBytes {
            bytes,
            prefix_len,
            layout,
            footprint,
        })
    }

    /// The parsed object (file meta group + data set).
    pub fn object(&self) -> &FileDicomObject<InMemDicomObject> {
        &self.object
    }

    /// The transfer syntax UID the data set is encoded in.
    pub fn transfer_syntax(&self) -> &str {
        self.object
            .meta()
            .transfer_syntax()
            .trim_end_matches(['\0', ' '])
    }

    /// Whether the file carried a file meta group (false: a bare data set
    /// whose encoding was detected).
    pub fn has_file_meta(&self) -> bool {
        self.has_file_meta
    }
}

/// An input in memory that passed the structural scan, ready to parse.
pub struct ScannedBytes<'a> {
    bytes: &'a [u8],
    prefix_len: usize,
    layout: Layout,
    footprint: Footprint,
}

impl std::fmt::Debug for ScannedBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Deliberately not the bytes: they may identify the patient.
        f.debug_struct("ScannedBytes")
            .field("len", &self.bytes.len())
            .field("layout", &self.layout)
            .field("footprint", &self.footprint)
            .finish_non_exhaustive()
    }
}

impl ScannedBytes<'_> {
    /// What the parsed data set will hold.
    pub fn footprint(&self) -> Footprint {
        self.footprint
    }

    /// Parses the scanned input.
    ///
    /// # Errors
    /// [`DicomError::NotDicom`] when dicom-rs refuses it.
    pub fn parse(self) -> Result<DicomFile> {
        let (prefix, rest) = self.bytes.split_at(self.prefix_len);
        parse_guarded(prefix, self.layout, rest)
    }
}

/// Bytes read before the layout is decided: preamble (128) + `DICM` (4).
const PREFIX_LEN: usize = 132;

/// Read buffer of the structural scan over a file.
const SCAN_BUFFER: usize = 1 << 16;

/// How an input is laid out, decided from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `DICM` at this offset (128 after a preamble, or 0), the file meta
    /// group after it.
    Magic(usize),
    /// The file meta group at offset 0, with neither preamble nor magic.
    MetaWithoutMagic,
    /// A data set without file meta group, in the detected transfer syntax.
    Bare(&'static str),
}

impl Layout {
    /// Decides the layout from the first [`PREFIX_LEN`] bytes.
    fn detect(prefix: &[u8]) -> Result<Layout> {
        if prefix.is_empty() {
            return Err(DicomError::Empty);
        }
        if prefix.len() >= 132 && &prefix[128..132] == b"DICM" {
            return Ok(Layout::Magic(128));
        }
        if prefix.starts_with(b"DICM") {
            return Ok(Layout::Magic(0));
        }
        if prefix.len() >= 6 && prefix[..2] == [0x02, 0x00] && is_vr(&prefix[4..6]) {
            return Ok(Layout::MetaWithoutMagic);
        }
        detect_bare_encoding(prefix)
            .map(Layout::Bare)
            .ok_or_else(|| DicomError::NotDicom {
                reason: "no DICM magic and the first bytes are not a DICOM element header"
                    .to_owned(),
            })
    }

    /// Offset of the first byte the structural scan reads: the file meta
    /// group, or the bare data set.
    fn scan_from(self) -> usize {
        match self {
            Layout::Magic(at) => at + 4,
            Layout::MetaWithoutMagic | Layout::Bare(_) => 0,
        }
    }
}

/// Runs the structural pre-scan ([`super::scan`]) over `input`: the `len`
/// bytes from [`Layout::scan_from`] on.
fn scan_guarded(
    layout: Layout,
    input: impl Read,
    len: u64,
    limits: &LimitsConfig,
    name: &str,
) -> Result<Footprint> {
    crate::guard::no_panic("DICOM structure scan", || match layout {
        Layout::Bare(uid) => scan::scan_data_set(input, len, uid, name),
        Layout::Magic(_) | Layout::MetaWithoutMagic => scan::scan_part10(input, len, limits, name),
    })
    .map_err(|reason| DicomError::NotDicom { reason })?
}

fn parse_guarded(prefix: &[u8], layout: Layout, rest: impl Read) -> Result<DicomFile> {
    crate::guard::no_panic("DICOM parser", || parse(prefix, layout, rest))
        .map_err(|reason| DicomError::NotDicom { reason })?
}

/// Parses an input whose first bytes are `prefix` and whose remainder is
/// `rest`, once the structural scan has passed.
fn parse(prefix: &[u8], layout: Layout, rest: impl Read) -> Result<DicomFile> {
    let not_dicom = |e: &dyn std::fmt::Display| DicomError::NotDicom {
        reason: one_line(e),
    };
    let ts_uid = match layout {
        Layout::Magic(at) => return parse_part10(b"", &prefix[at..], rest),
        // The file meta group with neither preamble nor magic: restore the magic.
        Layout::MetaWithoutMagic => return parse_part10(b"DICM", prefix, rest),
        Layout::Bare(uid) => uid,
    };
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| DicomError::NotDicom {
            reason: format!("transfer syntax {ts_uid} is not registered"),
        })?;
    let reader = BufReader::with_capacity(1 << 16, prefix.chain(rest));
    let dataset = InMemDicomObject::read_dataset_with_ts(reader, ts).map_err(|e| not_dicom(&e))?;
    let text = |tag| {
        dataset
            .get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
    };
    let sop_class = text(tags::SOP_CLASS_UID)
        .unwrap_or_else(|| uids::SECONDARY_CAPTURE_IMAGE_STORAGE.to_owned());
    let sop_instance = text(tags::SOP_INSTANCE_UID).unwrap_or_else(|| "2.25.0".to_owned());
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(ts_uid)
        .build()
        .map_err(|e| not_dicom(&e))?;
    Ok(DicomFile {
        object: dataset.with_exact_meta(meta),
        has_file_meta: false,
    })
}

/// Parses a Part 10 input: `magic` (empty, or `DICM` restored), then `from`
/// (the prefix from `DICM` or the meta group on), then `rest`.
fn parse_part10(magic: &[u8], from: &[u8], rest: impl Read) -> Result<DicomFile> {
    let reader = BufReader::with_capacity(1 << 16, magic.chain(from).chain(rest));
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(reader)
        .map_err(|e| DicomError::NotDicom {
            reason: one_line(&e),
        })?;
    Ok(DicomFile {
        object,
        has_file_meta: true,
    })
}

/// Guesses the encoding of a data set without file meta from its first
/// element header: group and element numbers, then either a two-letter VR
/// (explicit) or a 32-bit length (implicit).
fn detect_bare_encoding(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 8 {
        return None;
    }
    let group_le = u16::from_le_bytes([bytes[0], bytes[1]]);
    let group_be = u16::from_be_bytes([bytes[0], bytes[1]]);
    let plausible = |g: u16| g != 0 && g.is_multiple_of(2) && g <= 0x0100;
    let explicit = is_vr(&bytes[4..6]);
    if plausible(group_le) {
        Some(if explicit {
            uids::EXPLICIT_VR_LITTLE_ENDIAN
        } else {
            uids::IMPLICIT_VR_LITTLE_ENDIAN
        })
    } else if plausible(group_be) && explicit {
        Some(EXPLICIT_VR_BIG_ENDIAN)
    } else {
        None
    }
}

/// Whether two bytes spell one of the value representations of PS3.5 6.2.
fn is_vr(code: &[u8]) -> bool {
    const VRS: [&[u8; 2]; 34] = [
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
        b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
        b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
    ];
    VRS.iter().any(|vr| vr.as_slice() == code)
}

/// A parser message on one line (dicom-rs errors can nest).
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_encodings_are_detected() {
        // (0008,0005) CS in explicit VR LE
        let explicit_le = [0x08, 0x00, 0x05, 0x00, b'C', b'S', 0x0a, 0x00];
        assert_eq!(
            detect_bare_encoding(&explicit_le),
            Some(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        );
        // (0008,0005) implicit VR LE, length 10
        let implicit_le = [0x08, 0x00, 0x05, 0x00, 0x0a, 0x00, 0x00, 0x00];
        assert_eq!(
            detect_bare_encoding(&implicit_le),
            Some(uids::IMPLICIT_VR_LITTLE_ENDIAN)
        );
        let explicit_be = [0x00, 0x08, 0x00, 0x05, b'C', b'S', 0x00, 0x0a];
        assert_eq!(
            detect_bare_encoding(&explicit_be),
            Some(EXPLICIT_VR_BIG_ENDIAN)
        );
        assert_eq!(detect_bare_encoding(b"%PDF-1.7 hello"), None);
    }

    #[test]
    fn empty_and_garbage_are_refused() {
        let limits = LimitsConfig::default();
        assert!(matches!(
            DicomFile::from_bytes(b"", &limits),
            Err(DicomError::Empty)
        ));
        assert!(matches!(
            DicomFile::from_bytes(b"GIF89a not a dicom file at all", &limits),
            Err(DicomError::NotDicom { .. })
        ));
    }
}
