//! Pixels: frame 1 of Pixel Data (7FE0,0010) → stored values.
//!
//! Stored values are the integers the modality wrote, before the modality
//! LUT: Bits Allocated / Bits Stored / High Bit / Pixel Representation are
//! honoured (unused high bits masked off, two's complement sign-extended).
//!
//! | transfer syntax                        | decoder                              |
//! |----------------------------------------|--------------------------------------|
//! | implicit/explicit VR LE, explicit BE, deflated | read directly (dicom-object)  |
//! | RLE lossless (8, 16, 32 bits)          | [`super::rle`]                       |
//! | JPEG baseline, extended 12-bit, lossless (14, SV1) | libjpeg-turbo 3 ([`super::jpeg`]) |
//! | JPEG-LS lossless and near-lossless     | CharLS, through dicom-rs             |
//! | JPEG 2000 lossless and lossy, HTJ2K    | OpenJPEG, through `jpeg2k`           |
//!
//! Compressed streams are checked before decoding: the image size a stream
//! declares must equal Rows × Columns, so a hostile stream cannot make a
//! decoder allocate more than the (size-limited) header allows. The size is
//! read where the decoder reads it, never found by searching for a byte
//! pattern (which a decoy ahead of the real header would satisfy): a JPEG 2000
//! codestream starts with SOC and SIZ at offset 0 (or at the start of a JP2
//! file's codestream box, and then only that codestream is decoded); JPEG-LS
//! marker segments are walked by their lengths from SOI to the frame header
//! (SOF55), refusing a second one; JPEG's header is read by libjpeg-turbo
//! itself ([`super::jpeg`]).

use std::borrow::Cow;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::transfer_syntax::Codec;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::header::Geometry;
use super::read::DicomFile;
use super::{DicomError, Result, jpeg, rle};
use crate::guard::no_panic;

/// Frame 1 as decoded, row-major, with the rule that turns each sample into
/// its stored value.
///
/// 8- and 16-bit samples are kept as they are (borrowed from the parsed file
/// when uncompressed): masking the unused bits and sign extension are folded
/// into the preprocessing table, so no pass over the pixels is spent on them.
#[derive(Debug, Clone)]
pub struct DecodedFrame<'a> {
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub columns: u32,
    /// rows × columns samples.
    pub samples: Samples<'a>,
    /// Sample → stored value.
    pub bits: StoredBits,
}

/// The samples of a frame.
#[derive(Debug, Clone)]
pub enum Samples<'a> {
    /// 8-bit (or 1-bit, unpacked) samples.
    U8(Cow<'a, [u8]>),
    /// 16-bit samples (12-bit JPEG too), as unsigned words.
    U16(Cow<'a, [u16]>),
    /// Wider data, or data a decoder already turned into stored values.
    Stored(Vec<i32>),
}

/// Turns a sample word into a stored value: shift down to the stored bits,
/// keep `bits` of them, sign-extend when signed (PS3.5 8.1.1: the other bits
/// are undefined, e.g. overlays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBits {
    shift: u32,
    bits: u32,
    signed: bool,
}

impl StoredBits {
    /// The sample is the stored value.
    pub const IDENTITY: StoredBits = StoredBits {
        shift: 0,
        bits: 32,
        signed: true,
    };

    /// The rule the header describes: Bits Stored ending at High Bit, with
    /// Pixel Representation's sign.
    pub fn from_geometry(g: &Geometry) -> Self {
        Self {
            shift: u32::from(g.high_bit) + 1 - u32::from(g.bits_stored),
            bits: u32::from(g.bits_stored),
            signed: g.signed,
        }
    }

    /// Samples that are `bits`-bit integers of the given sign.
    pub fn width(bits: u32, signed: bool) -> Self {
        Self {
            shift: 0,
            bits,
            signed,
        }
    }

    /// The stored value of a sample word.
    pub fn stored(&self, sample: u32) -> i64 {
        let v = sample >> self.shift;
        if self.bits >= 32 {
            return if self.signed {
                i64::from(v as i32)
            } else {
                i64::from(v)
            };
        }
        let unused = 32 - self.bits;
        if self.signed {
            i64::from(((v << unused) as i32) >> unused)
        } else {
            i64::from((v << unused) >> unused)
        }
    }
}

impl DecodedFrame<'_> {
    /// Every stored value, row-major (for tools and tests; ingest never
    /// materialises this).
    pub fn stored_values(&self) -> Vec<i64> {
        match &self.samples {
            Samples::U8(s) => s.iter().map(|&v| self.bits.stored(v.into())).collect(),
            Samples::U16(s) => s.iter().map(|&v| self.bits.stored(v.into())).collect(),
            Samples::Stored(s) => s.iter().map(|&v| i64::from(v)).collect(),
        }
    }
}

/// How a transfer syntax's pixel data is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Native { big_endian: bool },
    Rle,
    Jpeg,
    JpegLs,
    Jpeg2000,
}

/// Every transfer syntax the ingest reads and decodes (what the DICOM
/// listener accepts at negotiation; the order is the listener's preference
/// when a peer proposes several in one presentation context: lossless and
/// uncompressed first).
pub const READABLE_TRANSFER_SYNTAXES: [&str; 16] = [
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    super::read::EXPLICIT_VR_BIG_ENDIAN,
    uids::RLE_LOSSLESS,
    uids::JPEG_LOSSLESS_SV1,
    uids::JPEG_LOSSLESS,
    uids::JPEGLS_LOSSLESS,
    uids::JPEG2000_LOSSLESS,
    uids::HTJ2K_LOSSLESS,
    uids::HTJ2K_LOSSLESS_RPCL,
    uids::JPEG_BASELINE8_BIT,
    uids::JPEG_EXTENDED12_BIT,
    uids::JPEGLS_NEAR_LOSSLESS,
    uids::JPEG2000,
    uids::HTJ2K,
];

fn decoder_for(ts: &str) -> Option<Decoder> {
    Some(match ts {
        uids::IMPLICIT_VR_LITTLE_ENDIAN
        | uids::EXPLICIT_VR_LITTLE_ENDIAN
        | uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN => Decoder::Native { big_endian: false },
        super::read::EXPLICIT_VR_BIG_ENDIAN => Decoder::Native { big_endian: true },
        uids::RLE_LOSSLESS => Decoder::Rle,
        uids::JPEG_BASELINE8_BIT
        | uids::JPEG_EXTENDED12_BIT
        | uids::JPEG_LOSSLESS
        | uids::JPEG_LOSSLESS_SV1 => Decoder::Jpeg,
        uids::JPEGLS_LOSSLESS | uids::JPEGLS_NEAR_LOSSLESS => Decoder::JpegLs,
        uids::JPEG2000_LOSSLESS
        | uids::JPEG2000
        | uids::HTJ2K_LOSSLESS
        | uids::HTJ2K_LOSSLESS_RPCL
        | uids::HTJ2K => Decoder::Jpeg2000,
        _ => return None,
    })
}

/// Whether lossy compression may have been applied under this transfer syntax.
pub fn is_lossy_transfer_syntax(ts: &str) -> bool {
    matches!(
        ts,
        uids::JPEG_BASELINE8_BIT
            | uids::JPEG_EXTENDED12_BIT
            | uids::JPEGLS_NEAR_LOSSLESS
            | uids::JPEG2000
            | uids::HTJ2K
    )
}

/// Decodes frame 1 of `file` into stored values.
///
/// # Errors
/// [`DicomError::UnsupportedTransferSyntax`], [`DicomError::InvalidPixelData`]
/// (short or misplaced pixel data), [`DicomError::CorruptStream`].
pub fn decode_first_frame<'a>(
    file: &'a DicomFile,
    geometry: &Geometry,
) -> Result<DecodedFrame<'a>> {
    let ts = file.transfer_syntax();
    let decoder = decoder_for(ts).ok_or_else(|| DicomError::UnsupportedTransferSyntax {
        uid: ts.to_owned(),
        name: TransferSyntaxRegistry
            .get(ts)
            .map_or_else(|| "unknown".to_owned(), |t| t.name().to_owned()),
    })?;
    let header_bits = StoredBits::from_geometry(geometry);
    let (samples, bits) = match decoder {
        Decoder::Native { big_endian } => (native(file, geometry, big_endian)?, header_bits),
        Decoder::Jpeg => {
            let stream = encapsulated_frame(file)?;
            let samples = no_panic("JPEG decoder", || {
                jpeg::decode(&stream, geometry.rows, geometry.columns)
            })
            .map_err(|reason| DicomError::CorruptStream {
                codec: "JPEG",
                reason,
            })??;
            (samples, header_bits)
        }
        Decoder::Rle => {
            let stream = encapsulated_frame(file)?;
            let raw = rle::decode(&stream, geometry.pixels(), geometry.bits_allocated)?;
            let samples = match geometry.bits_allocated {
                8 => Samples::U8(Cow::Owned(raw.into_iter().map(|v| v as u8).collect())),
                16 => Samples::U16(Cow::Owned(raw.into_iter().map(|v| v as u16).collect())),
                _ => Samples::Stored(stored_from_words(&raw, geometry)?),
            };
            (samples, header_bits)
        }
        Decoder::JpegLs => {
            let stream = encapsulated_frame(file)?;
            let precision = check_jpeg_ls_size(&stream, geometry)?;
            let bytes = registry_decode(file, "JPEG-LS")?;
            let n = geometry.pixels();
            let samples = if bytes.len() == n {
                Samples::U8(Cow::Owned(bytes))
            } else if bytes.len() == 2 * n {
                Samples::U16(Cow::Owned(
                    bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ))
            } else {
                return Err(DicomError::CorruptStream {
                    codec: "JPEG-LS",
                    reason: format!("decoded {} bytes for {n} pixels", bytes.len()),
                });
            };
            // JPEG-LS has no notion of sign: signed data comes back unsigned
            // and is sign-extended from the stream's precision.
            let bits = StoredBits::width(
                if geometry.signed { precision } else { 32 },
                geometry.signed,
            );
            (samples, bits)
        }
        Decoder::Jpeg2000 => {
            let stream = encapsulated_frame(file)?;
            (
                Samples::Stored(jpeg2000(&stream, geometry)?),
                StoredBits::IDENTITY,
            )
        }
    };
    Ok(DecodedFrame {
        rows: geometry.rows,
        columns: geometry.columns,
        samples,
        bits,
    })
}

/// Native (uncompressed) pixel data: frame 1 is the first rows×columns samples.
fn native<'a>(file: &'a DicomFile, g: &Geometry, big_endian: bool) -> Result<Samples<'a>> {
    let element = file
        .object()
        .get(tags::PIXEL_DATA)
        .ok_or(DicomError::MissingAttribute {
            keyword: "PixelData",
            tag: "(7FE0,0010)",
        })?;
    let value = match element.value() {
        Value::Primitive(p) => p,
        Value::PixelSequence(_) => {
            return Err(DicomError::InvalidPixelData {
                reason: "encapsulated fragments under a native transfer syntax".to_owned(),
            });
        }
        Value::Sequence(_) => {
            return Err(DicomError::InvalidPixelData {
                reason: "a sequence, not pixel data".to_owned(),
            });
        }
    };
    let n = g.pixels();
    match (value, g.bits_allocated) {
        // OW already decoded to native 16-bit words by the parser: borrowed.
        (PrimitiveValue::U16(words), 16) => {
            check_len(words.len(), n, "16-bit words")?;
            Ok(Samples::U16(Cow::Borrowed(&words[..n])))
        }
        (PrimitiveValue::U8(bytes), 8) => {
            check_len(bytes.len(), n, "bytes")?;
            Ok(Samples::U8(Cow::Borrowed(&bytes[..n])))
        }
        // Other depths in OW: restore the file's byte order, then read samples.
        (PrimitiveValue::U16(words), _) => {
            let bytes: Vec<u8> = words
                .iter()
                .flat_map(|w| {
                    if big_endian {
                        w.to_be_bytes()
                    } else {
                        w.to_le_bytes()
                    }
                })
                .collect();
            samples_from_bytes(&bytes, g, big_endian, "native")
        }
        (PrimitiveValue::U8(bytes), _) => samples_from_bytes(bytes, g, big_endian, "native"),
        // Anything else the parser produced: its bytes in this machine's order.
        (other, _) => {
            let bytes: Cow<'_, [u8]> = other.to_bytes();
            samples_from_bytes(&bytes, g, cfg!(target_endian = "big"), "native")
        }
    }
}

fn check_len(have: usize, need: usize, unit: &str) -> Result<()> {
    if have < need {
        return Err(DicomError::InvalidPixelData {
            reason: format!("{have} {unit}, frame 1 needs {need}"),
        });
    }
    Ok(())
}

/// Reads frame 1 from a byte buffer of `bits_allocated`-sized samples.
fn samples_from_bytes(
    bytes: &[u8],
    g: &Geometry,
    big_endian: bool,
    what: &str,
) -> Result<Samples<'static>> {
    let n = g.pixels();
    let unit = || format!("bytes of {what} pixel data");
    Ok(match g.bits_allocated {
        1 => {
            check_len(bytes.len(), n.div_ceil(8), &unit())?;
            Samples::U8(Cow::Owned(
                (0..n).map(|i| (bytes[i / 8] >> (i % 8)) & 1).collect(),
            ))
        }
        8 => {
            check_len(bytes.len(), n, &unit())?;
            Samples::U8(Cow::Owned(bytes[..n].to_vec()))
        }
        16 => {
            check_len(bytes.len(), n * 2, &unit())?;
            Samples::U16(Cow::Owned(
                bytes[..n * 2]
                    .chunks_exact(2)
                    .map(|c| {
                        if big_endian {
                            u16::from_be_bytes([c[0], c[1]])
                        } else {
                            u16::from_le_bytes([c[0], c[1]])
                        }
                    })
                    .collect(),
            ))
        }
        32 => {
            check_len(bytes.len(), n * 4, &unit())?;
            let words: Vec<u32> = bytes[..n * 4]
                .chunks_exact(4)
                .map(|c| {
                    let b = [c[0], c[1], c[2], c[3]];
                    if big_endian {
                        u32::from_be_bytes(b)
                    } else {
                        u32::from_le_bytes(b)
                    }
                })
                .collect();
            Samples::Stored(stored_from_words(&words, g)?)
        }
        other => {
            return Err(DicomError::InvalidAttribute {
                keyword: "BitsAllocated",
                tag: "(0028,0100)",
                reason: format!("{other}"),
            });
        }
    })
}

/// 32-bit sample words → stored values (which must fit in 32 signed bits).
fn stored_from_words(words: &[u32], g: &Geometry) -> Result<Vec<i32>> {
    let bits = StoredBits::from_geometry(g);
    words
        .iter()
        .map(|&w| {
            let v = bits.stored(w);
            i32::try_from(v).map_err(|_| DicomError::InvalidPixelData {
                reason: format!("stored value {v} does not fit in 32 signed bits"),
            })
        })
        .collect()
}

/// Reinterprets each value as a `bits`-bit integer: masked to `bits` when
/// unsigned, sign-extended from bit `bits − 1` when signed.
fn reinterpret(values: &mut [i32], bits: u32, signed: bool) {
    if bits >= 32 {
        return;
    }
    let unused = 32 - bits;
    for v in values.iter_mut() {
        *v = if signed {
            (*v << unused) >> unused
        } else {
            ((*v as u32) << unused >> unused) as i32
        };
    }
}

/// The encoded bytes of frame 1 of encapsulated pixel data.
fn encapsulated_frame(file: &DicomFile) -> Result<Cow<'_, [u8]>> {
    match file.object().get(tags::PIXEL_DATA).map(|e| e.value()) {
        Some(Value::PixelSequence(seq)) if !seq.fragments().is_empty() => {}
        Some(Value::PixelSequence(_)) => {
            return Err(DicomError::InvalidPixelData {
                reason: "encapsulated pixel data has no fragments".to_owned(),
            });
        }
        Some(_) => {
            return Err(DicomError::InvalidPixelData {
                reason: "native pixel data under a compressed transfer syntax".to_owned(),
            });
        }
        None => {
            return Err(DicomError::MissingAttribute {
                keyword: "PixelData",
                tag: "(7FE0,0010)",
            });
        }
    }
    file.object()
        .frame_pixel_data(0)
        .ok_or_else(|| DicomError::InvalidPixelData {
            reason: "frame 1 cannot be located in the fragments (offset table)".to_owned(),
        })
}

/// Decodes frame 1 with the dicom-rs codec registered for the file's transfer syntax.
fn registry_decode(file: &DicomFile, codec: &'static str) -> Result<Vec<u8>> {
    let ts = TransferSyntaxRegistry
        .get(file.transfer_syntax())
        .ok_or_else(|| DicomError::UnsupportedTransferSyntax {
            uid: file.transfer_syntax().to_owned(),
            name: "unknown".to_owned(),
        })?;
    let Codec::EncapsulatedPixelData(Some(reader), _) = ts.codec() else {
        return Err(DicomError::UnsupportedTransferSyntax {
            uid: ts.uid().to_owned(),
            name: format!("{} (no decoder in this build)", ts.name()),
        });
    };
    let mut out = Vec::new();
    no_panic(codec, || reader.decode_frame(file.object(), 0, &mut out))
        .map_err(|reason| DicomError::CorruptStream { codec, reason })?
        .map_err(|e| DicomError::CorruptStream {
            codec,
            reason: e.to_string().replace('\n', " "),
        })?;
    Ok(out)
}

/// The JPEG-LS frame header (SOF55): (precision, rows, columns), found the
/// way the decoder finds it: marker segment by marker segment from SOI, each
/// skipped by its length, up to the first scan (SOS). A byte pattern inside
/// another segment (an APPn, a comment) is never taken for the header.
///
/// # Errors
/// What is wrong with the marker structure: no SOI, a truncated segment, a
/// second frame header, a scan before the frame header, or an oversize
/// dimension (LSE 4) that would override it.
fn jpeg_ls_sof(stream: &[u8]) -> std::result::Result<(u32, u32, u32), String> {
    if !stream.starts_with(&[0xFF, 0xD8]) {
        return Err("the stream does not start with SOI (FFD8)".to_owned());
    }
    let mut at = 2;
    let mut frame = None;
    loop {
        if stream.get(at) != Some(&0xFF) {
            return Err(format!("no marker at byte {at} before the scan"));
        }
        // Fill bytes (FF) may precede a marker code.
        while stream.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&code) = stream.get(at) else {
            return Err("the stream ends before its scan".to_owned());
        };
        at += 1;
        // Markers without a segment (SOI, EOI, RSTn, TEM) do not belong
        // between SOI and the first scan.
        if matches!(code, 0x01 | 0xD0..=0xD9) {
            return Err(format!("marker FF{code:02X} before the scan"));
        }
        let length = stream
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| format!("marker FF{code:02X} has no segment length"))?;
        let segment = stream
            .get(at + 2..at + length.max(2))
            .filter(|_| length >= 2)
            .ok_or_else(|| format!("segment FF{code:02X} of {length} bytes overruns the stream"))?;
        match code {
            0xF7 => {
                if frame.is_some() {
                    return Err("a second frame header (SOF55)".to_owned());
                }
                let sof = segment
                    .get(..5)
                    .ok_or_else(|| "a frame header (SOF55) shorter than 5 bytes".to_owned())?;
                frame = Some((
                    u32::from(sof[0]),
                    u32::from(u16::from_be_bytes([sof[1], sof[2]])),
                    u32::from(u16::from_be_bytes([sof[3], sof[4]])),
                ));
            }
            // LSE with ID 4 carries 32-bit image dimensions that replace
            // the frame header's.
            0xF8 if segment.first() == Some(&4) => {
                return Err("an oversize image dimension segment (LSE 4)".to_owned());
            }
            0xDA => {
                return frame
                    .ok_or_else(|| "a scan (SOS) before the frame header (SOF55)".to_owned());
            }
            _ => {}
        }
        at += length;
    }
}

/// Checks the stream's size against the header; returns its precision.
fn check_jpeg_ls_size(stream: &[u8], g: &Geometry) -> Result<u32> {
    let corrupt = |reason: String| DicomError::CorruptStream {
        codec: "JPEG-LS",
        reason,
    };
    let (precision, rows, columns) =
        jpeg_ls_sof(stream).map_err(|e| corrupt(format!("frame header (SOF55): {e}")))?;
    if rows != g.rows || columns != g.columns {
        return Err(corrupt(format!(
            "stream is {columns}x{rows} pixels, the header says {}x{}",
            g.columns, g.rows
        )));
    }
    Ok(precision)
}

/// SOC then SIZ: how every JPEG 2000 codestream starts.
const J2K_SOC_SIZ: [u8; 4] = [0xFF, 0x4F, 0xFF, 0x51];

/// The JP2 signature box (ISO/IEC 15444-1 I.5.1).
const JP2_SIGNATURE: [u8; 12] = [
    0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20, 0x0D, 0x0A, 0x87, 0x0A,
];

/// The JPEG 2000 codestream of a frame: the frame itself, which must start
/// with SOC and SIZ at offset 0, or, for the JP2 files some encoders write
/// despite PS3.5 8.2.4, the contents of the first codestream box (`jp2c`),
/// found by walking the boxes by their lengths. Only this codestream is
/// decoded, so the SIZ checked is the SIZ the decoder reads, and no JP2
/// header box (palette, channel definitions) is interpreted.
///
/// # Errors
/// Why no codestream starts where it must.
fn j2k_codestream(stream: &[u8]) -> std::result::Result<&[u8], String> {
    if stream.starts_with(&J2K_SOC_SIZ) {
        return Ok(stream);
    }
    if !stream.starts_with(&JP2_SIGNATURE) {
        return Err("the stream does not start with SOC and SIZ (FF4F FF51)".to_owned());
    }
    let mut at = 0usize;
    while at < stream.len() {
        let header = stream
            .get(at..at + 8)
            .ok_or_else(|| format!("a JP2 box header cut off at byte {at}"))?;
        let lbox = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let kind = &header[4..8];
        let (start, len) = match lbox {
            // To the end of the stream.
            0 => (8, (stream.len() - at) as u64),
            // A 64-bit length follows the type.
            1 => {
                let xl = stream
                    .get(at + 8..at + 16)
                    .ok_or_else(|| format!("a JP2 box header cut off at byte {at}"))?;
                (16, u64::from_be_bytes(xl.try_into().unwrap_or([0xFF; 8])))
            }
            n => (8, u64::from(n)),
        };
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
            .filter(|&end| end <= stream.len() && len >= start as u64)
            .ok_or_else(|| format!("a JP2 box of {len} bytes at byte {at} overruns the stream"))?;
        if kind == b"jp2c" {
            let codestream = &stream[at + start..end];
            if !codestream.starts_with(&J2K_SOC_SIZ) {
                return Err(
                    "the JP2 codestream box does not start with SOC and SIZ (FF4F FF51)".to_owned(),
                );
            }
            return Ok(codestream);
        }
        at = end;
    }
    Err("a JP2 file without codestream box (jp2c)".to_owned())
}

/// Most tiles a JPEG 2000 codestream may declare. OpenJPEG allocates a few
/// kilobytes of coding parameters for every tile the SIZ marker declares
/// before it reads any tile, so a SIZ of 1 × 1 tiles over a 255 × 255 image
/// (65,025 tiles, under 500 bytes of file) cost about 490 MiB. Encoders
/// write one tile, or tiles of hundreds of pixels a side (4096 is a
/// 4096 × 4096 image in 64 × 64 tiles).
const MAX_J2K_TILES: u64 = 4096;

/// What a JPEG 2000 image and tile size marker (SIZ, ISO/IEC 15444-1
/// A.5.1) declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct J2kSiz {
    /// Image width, `Xsiz - XOsiz`.
    width: u32,
    /// Image height, `Ysiz - YOsiz`.
    height: u32,
    /// Components, `Csiz`.
    components: u32,
    /// Tiles across and down: `(Xsiz - XTOsiz) / XTsiz` and
    /// `(Ysiz - YTOsiz) / YTsiz`, rounded up; `None` for a tile grid the
    /// standard rules out (a tile side of 0, a tile origin past the image
    /// origin or past the image).
    tile_grid: Option<(u32, u32)>,
}

impl J2kSiz {
    /// Tiles in all (`None` as for [`J2kSiz::tile_grid`]).
    fn tiles(&self) -> Option<u64> {
        self.tile_grid
            .map(|(across, down)| u64::from(across) * u64::from(down))
    }
}

/// The SIZ marker of a codestream that starts with SOC and SIZ; `None` when
/// it is cut off or its image origin lies past its image.
fn j2k_siz(codestream: &[u8]) -> Option<J2kSiz> {
    if !codestream.starts_with(&J2K_SOC_SIZ) {
        return None;
    }
    // After the marker: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz,
    // XTOsiz, YTOsiz (16/32-bit big-endian), then Csiz.
    let siz = codestream.get(6..42)?;
    let be32 = |i: usize| u32::from_be_bytes([siz[i], siz[i + 1], siz[i + 2], siz[i + 3]]);
    let (xsiz, ysiz, x0, y0) = (be32(2), be32(6), be32(10), be32(14));
    let (tile_w, tile_h, tile_x0, tile_y0) = (be32(18), be32(22), be32(26), be32(30));
    let csiz = u32::from(u16::from_be_bytes([siz[34], siz[35]]));
    // A.5.1: 0 <= XTOsiz <= XOsiz, XTsiz + XTOsiz > XOsiz (and so for Y).
    let across = |size: u32, origin: u32, tile: u32, tile_origin: u32| {
        let valid = tile > 0
            && tile_origin <= origin
            && u64::from(tile) + u64::from(tile_origin) > u64::from(origin);
        valid.then(|| (size - tile_origin).div_ceil(tile))
    };
    let width = xsiz.checked_sub(x0)?;
    let height = ysiz.checked_sub(y0)?;
    let tile_grid = across(xsiz, x0, tile_w, tile_x0).zip(across(ysiz, y0, tile_h, tile_y0));
    Some(J2kSiz {
        width,
        height,
        components: csiz,
        tile_grid,
    })
}

fn jpeg2000(stream: &[u8], g: &Geometry) -> Result<Vec<i32>> {
    let corrupt = |reason: String| DicomError::CorruptStream {
        codec: "JPEG 2000",
        reason,
    };
    let stream = j2k_codestream(stream).map_err(corrupt)?;
    let siz = j2k_siz(stream).ok_or_else(|| corrupt("SIZ marker cut off".to_owned()))?;
    let (width, height, components) = (siz.width, siz.height, siz.components);
    if width != g.columns || height != g.rows {
        return Err(corrupt(format!(
            "stream is {width}x{height} pixels, the header says {}x{}",
            g.columns, g.rows
        )));
    }
    if components != 1 {
        return Err(corrupt(format!(
            "{components} components; a grayscale image has 1"
        )));
    }
    // The decoder allocates per declared tile before reading one: the
    // grid is checked first.
    match siz.tiles() {
        None => {
            return Err(corrupt(
                "the SIZ marker's tile grid is invalid (tile size 0 or tile origin past the image origin)"
                    .to_owned(),
            ));
        }
        Some(tiles) if tiles > MAX_J2K_TILES => {
            return Err(corrupt(format!(
                "the SIZ marker declares {tiles} tiles, more than the {MAX_J2K_TILES} allowed"
            )));
        }
        Some(_) => {}
    }
    let params = jpeg2k::DecodeParameters::new().strict(true);
    let image = no_panic("JPEG 2000 decoder", || {
        jpeg2k::Image::from_bytes_with(stream, params)
    })
    .map_err(corrupt)?
    .map_err(|e| corrupt(e.to_string()))?;
    let component = image
        .components()
        .first()
        .ok_or_else(|| corrupt("no image component".to_owned()))?;
    let data = component.data();
    if component.width() != g.columns || component.height() != g.rows || data.len() != g.pixels() {
        return Err(corrupt(format!(
            "decoded {}x{} samples, expected {}x{}",
            component.width(),
            component.height(),
            g.columns,
            g.rows
        )));
    }
    let mut values = data.to_vec();
    // Streams whose signedness disagrees with Pixel Representation are common
    // (encoders that ignore it): reinterpret the samples' bits as the header says.
    if component.is_signed() != g.signed {
        reinterpret(&mut values, component.precision(), g.signed);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_readable_transfer_syntax_has_a_decoder_and_no_other_does() {
        for ts in READABLE_TRANSFER_SYNTAXES {
            assert!(decoder_for(ts).is_some(), "{ts}");
        }
        let distinct: std::collections::BTreeSet<_> = READABLE_TRANSFER_SYNTAXES.iter().collect();
        assert_eq!(distinct.len(), READABLE_TRANSFER_SYNTAXES.len());
        // Anything else the registry knows is not read.
        for ts in [uids::MPEG2MPML, uids::JPIP_REFERENCED, uids::JPEG2000MC] {
            assert!(decoder_for(ts).is_none(), "{ts}");
        }
    }

    fn geometry(bits_allocated: u16, bits_stored: u16, high_bit: u16, signed: bool) -> Geometry {
        Geometry {
            rows: 1,
            columns: 2,
            frames: 1,
            bits_allocated,
            bits_stored,
            high_bit,
            signed,
            monochrome1: false,
        }
    }

    #[test]
    fn unused_bits_are_masked_or_sign_extended() {
        // 12 bits stored in 16: an overlay bit set in bit 13 must disappear.
        let unsigned = StoredBits::from_geometry(&geometry(16, 12, 11, false));
        assert_eq!(unsigned.stored(0x2FFF), 0x0FFF);
        assert_eq!(unsigned.stored(0x0800), 0x0800);
        let signed = StoredBits::from_geometry(&geometry(16, 12, 11, true));
        assert_eq!(signed.stored(0x0FFF), -1);
        assert_eq!(signed.stored(0x0800), -2048);
        assert_eq!(
            StoredBits::from_geometry(&geometry(16, 16, 15, true)).stored(0xFFFF),
            -1
        );
        // High bit above bits stored - 1: the stored bits are shifted down.
        assert_eq!(
            StoredBits::from_geometry(&geometry(8, 4, 7, false)).stored(0b1010_0000),
            0b1010
        );
        assert_eq!(StoredBits::IDENTITY.stored(u32::MAX), -1);
    }

    #[test]
    fn bytes_respect_endianness_and_length() {
        let g = geometry(16, 16, 15, false);
        let words = |s: Samples<'_>| match s {
            Samples::U16(w) => w.into_owned(),
            other => panic!("expected 16-bit samples, got {other:?}"),
        };
        let le = samples_from_bytes(&[0x01, 0x02, 0x03, 0x04], &g, false, "t").expect("ok");
        assert_eq!(words(le), vec![0x0201, 0x0403]);
        let be = samples_from_bytes(&[0x01, 0x02, 0x03, 0x04], &g, true, "t").expect("ok");
        assert_eq!(words(be), vec![0x0102, 0x0304]);
        let err = samples_from_bytes(&[0x01, 0x02, 0x03], &g, false, "t").expect_err("short");
        assert!(err.to_string().contains("frame 1 needs 4"), "{err}");
    }

    #[test]
    fn siz_marker_is_found() {
        let mut s = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        s.extend_from_slice(&100u32.to_be_bytes()); // Xsiz
        s.extend_from_slice(&80u32.to_be_bytes()); // Ysiz
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&64u32.to_be_bytes()); // XTsiz
        s.extend_from_slice(&64u32.to_be_bytes()); // YTsiz
        s.extend_from_slice(&[0u8; 8]);
        s.extend_from_slice(&1u16.to_be_bytes()); // Csiz
        let siz = j2k_siz(&s).expect("SIZ");
        assert_eq!((siz.width, siz.height, siz.components), (100, 80, 1));
        assert_eq!(siz.tile_grid, Some((2, 2)));
        assert_eq!(siz.tiles(), Some(4));
        assert_eq!(j2k_siz(&s[..20]), None);
        assert_eq!(j2k_codestream(&s), Ok(&s[..]));
    }

    fn siz(width: u32, height: u32) -> Vec<u8> {
        tiled_siz(width, height, width, height)
    }

    /// SOC and the SIZ of a one-component image in `tile_w` × `tile_h` tiles.
    fn tiled_siz(width: u32, height: u32, tile_w: u32, tile_h: u32) -> Vec<u8> {
        let mut s = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [width, height, 0, 0, tile_w, tile_h, 0, 0] {
            s.extend_from_slice(&v.to_be_bytes());
        }
        s.extend_from_slice(&1u16.to_be_bytes());
        s
    }

    #[test]
    fn the_tile_grid_is_counted_and_bounded() {
        // One tile, the usual case.
        assert_eq!(j2k_siz(&siz(2048, 2048)).and_then(|s| s.tiles()), Some(1));
        // Partial tiles at the right and bottom edges count.
        let siz = j2k_siz(&tiled_siz(100, 65, 64, 64)).expect("SIZ");
        assert_eq!(siz.tile_grid, Some((2, 2)));
        // A tile side of 0 is no grid.
        assert_eq!(
            j2k_siz(&tiled_siz(16, 16, 0, 16)).expect("SIZ").tiles(),
            None
        );
        // The bomb: 1 × 1 tiles over 255 × 255 pixels, refused before the
        // decoder sees it, with the count named.
        assert_eq!(
            j2k_siz(&tiled_siz(255, 255, 1, 1)).expect("SIZ").tiles(),
            Some(65_025)
        );
        let g = Geometry {
            rows: 255,
            columns: 255,
            ..geometry(16, 16, 15, false)
        };
        let err = jpeg2000(&tiled_siz(255, 255, 1, 1), &g).expect_err("too many tiles");
        assert!(err.to_string().contains("65025 tiles"), "{err}");
        // 4096 tiles (64 × 64 tiles of a 4096² image) pass the check and
        // reach the decoder, which refuses this stream for its own reasons.
        let g = Geometry {
            rows: 4096,
            columns: 4096,
            ..geometry(16, 16, 15, false)
        };
        let err = jpeg2000(&tiled_siz(4096, 4096, 64, 64), &g).expect_err("no tile data");
        assert!(!err.to_string().contains("tiles"), "{err}");
    }

    #[test]
    fn a_j2k_codestream_starts_at_offset_0_or_in_its_jp2_box() {
        // A decoy SOC+SIZ after leading bytes is not a codestream.
        let mut decoy = b"garbage!".to_vec();
        decoy.extend(siz(16, 16));
        assert!(j2k_codestream(&decoy).is_err());
        // JP2: a decoy inside an earlier box is skipped by the box walk;
        // the codestream box's SIZ is the one read.
        let mut jp2 = JP2_SIGNATURE.to_vec();
        let xml: Vec<u8> = siz(16, 16);
        jp2.extend_from_slice(&((8 + xml.len()) as u32).to_be_bytes());
        jp2.extend_from_slice(b"xml ");
        jp2.extend_from_slice(&xml);
        let real = siz(60_000, 60_000);
        jp2.extend_from_slice(&0u32.to_be_bytes());
        jp2.extend_from_slice(b"jp2c");
        jp2.extend_from_slice(&real);
        let codestream = j2k_codestream(&jp2).expect("jp2c box");
        let siz = j2k_siz(codestream).expect("SIZ");
        assert_eq!((siz.width, siz.height, siz.components), (60_000, 60_000, 1));
        // A box that claims more than the stream holds.
        let mut lying = JP2_SIGNATURE.to_vec();
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        lying.extend_from_slice(b"xml ");
        assert!(j2k_codestream(&lying).is_err());
    }

    fn segment(out: &mut Vec<u8>, code: u8, body: &[u8]) {
        out.extend_from_slice(&[0xFF, code]);
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
    }

    fn sof55(rows: u16, columns: u16) -> Vec<u8> {
        let mut b = vec![16];
        b.extend_from_slice(&rows.to_be_bytes());
        b.extend_from_slice(&columns.to_be_bytes());
        b.extend_from_slice(&[1, 1, 0x11, 0]);
        b
    }

    #[test]
    fn jpeg_ls_markers_are_walked_not_searched() {
        // A decoy frame header inside an APP8 segment, the real one after.
        let mut s = vec![0xFF, 0xD8];
        let mut app = b"decoy".to_vec();
        app.extend_from_slice(&[0xFF, 0xF7, 0x00, 0x0B]);
        app.extend(sof55(16, 16));
        segment(&mut s, 0xE8, &app);
        segment(&mut s, 0xF7, &sof55(60_000, 60_000));
        segment(&mut s, 0xDA, &[1, 1, 0, 0, 0, 0]);
        assert_eq!(jpeg_ls_sof(&s), Ok((16, 60_000, 60_000)));
        // Two frame headers, a scan before the frame, an oversize LSE.
        let mut two = vec![0xFF, 0xD8];
        segment(&mut two, 0xF7, &sof55(16, 16));
        segment(&mut two, 0xF7, &sof55(60_000, 60_000));
        segment(&mut two, 0xDA, &[1, 1, 0, 0, 0, 0]);
        assert!(jpeg_ls_sof(&two).is_err());
        let mut early = vec![0xFF, 0xD8];
        segment(&mut early, 0xDA, &[1, 1, 0, 0, 0, 0]);
        assert!(jpeg_ls_sof(&early).is_err());
        let mut oversize = vec![0xFF, 0xD8];
        segment(&mut oversize, 0xF7, &sof55(16, 16));
        segment(&mut oversize, 0xF8, &[4, 4, 0, 1, 0, 0, 0, 1, 0, 0]);
        segment(&mut oversize, 0xDA, &[1, 1, 0, 0, 0, 0]);
        assert!(jpeg_ls_sof(&oversize).is_err());
        // A segment that claims more than the stream holds.
        let mut cut = vec![0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF, 0x00];
        assert!(jpeg_ls_sof(&cut).is_err());
        cut.clear();
        assert!(jpeg_ls_sof(&cut).is_err());
    }
}
